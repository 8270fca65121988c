"""The M-H sampler against the exact softmax target and its contract (counts, stays, init states, rank slicing)."""
import pytest
import torch

from dual_emc2.loss.estimators.emc2.chain import draw_mh_proposals, mh_chains_torch, mh_visit_counts


def _tv(counts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    freq = counts / counts.sum(dim=1, keepdim=True)
    return 0.5 * (freq - target).abs().sum(dim=1)


def _target(scores, valid, beta):
    return torch.softmax((beta * scores).masked_fill(~valid, float("-inf")), dim=1)


def test_uniform_visits_match_softmax_with_masks():
    torch.manual_seed(0)
    B, C, beta = 4, 23, 3.0
    scores = torch.rand(B, C) * 2 - 1
    valid = torch.rand(B, C) > 0.25
    valid[:, 0] = True
    gen = torch.Generator().manual_seed(1)
    res = mh_visit_counts(scores, beta=beta, steps=200_000, burn_in=200, valid=valid, generator=gen)
    tv = _tv(res.counts, _target(scores, valid, beta))
    assert (tv < 0.02).all(), tv
    assert (res.counts[~valid] == 0).all(), "a masked candidate was visited"
    assert torch.equal(res.counts.sum(dim=1) + res.stay, torch.full((B,), 200_000 - 200.0))


def test_scan_visits_close_to_softmax_within_its_known_bias():
    # the released code's systematic scan is not exactly invariant (measured TV 0.019-0.024 at C=23, beta=3);
    # ours stays within 0.06 here while the uniform proposal is 3x closer on the same problem.
    torch.manual_seed(0)
    B, C, beta = 4, 23, 3.0
    scores = torch.rand(B, C) * 2 - 1
    valid = torch.ones(B, C, dtype=torch.bool)
    valid[1, :5] = False
    gen = torch.Generator().manual_seed(2)
    scan = mh_visit_counts(scores, beta=beta, steps=100_000, burn_in=100, valid=valid, proposal="permuted_scan",
                           generator=gen)
    uni = mh_visit_counts(scores, beta=beta, steps=100_000, burn_in=100, valid=valid, proposal="batch", generator=gen)
    target = _target(scores, valid, beta)
    tv_scan, tv_uni = _tv(scan.counts, target), _tv(uni.counts, target)
    assert (tv_scan < 0.06).all(), tv_scan
    assert (scan.counts[~valid] == 0).all()
    assert tv_uni.mean() < tv_scan.mean()


def test_scan_visits_every_valid_column_once_per_sweep():
    valid = torch.tensor([[True, False, True, True, True], [False, True, True, False, True]])
    prop = draw_mh_proposals(valid, steps=12, proposal="permuted_scan", generator=torch.Generator().manual_seed(0))
    idx = prop.index.t()
    assert sorted(idx[0, :4].tolist()) == [0, 2, 3, 4] and sorted(idx[0, 4:8].tolist()) == [0, 2, 3, 4]
    assert sorted(idx[1, :3].tolist()) == [1, 2, 4] and sorted(idx[1, 3:6].tolist()) == [1, 2, 4]


def test_uniform_proposals_are_uniform_over_valid_columns():
    valid = torch.tensor([[True, False, True, True, False, True]])
    prop = draw_mh_proposals(valid, steps=40_000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(prop.index[:, 0], minlength=6).float() / 40_000
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq[valid[0]], torch.full((4,), 0.25), atol=0.01)


def test_init_states_out_of_batch():
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.5, -0.5, 0.0]])
    gen = torch.Generator().manual_seed(0)
    # chain 0: no state (-inf): the first proposal is always accepted; chain 1: an out-of-batch state with a
    # score so high that nothing is ever accepted; chain 2: starts in-batch at column 1 with its current score.
    res = mh_visit_counts(scores, beta=5.0, steps=10, burn_in=2, init_index=torch.tensor([-1, -1, 1]),
                          init_score=torch.tensor([float("-inf"), 100.0, float("-inf")]), generator=gen)
    assert res.index[0] >= 0 and res.accepted[0] >= 1 and res.stay[0] == 0
    assert res.index[1] == -1 and res.score[1] == 100.0 and res.stay[1] == 8 and res.counts[1].sum() == 0
    assert res.index[2] >= 0 and res.stay[2] == 0
    assert res.score[2] == scores[2, res.index[2]]


@pytest.mark.determinism
def test_rank_slices_reproduce_the_full_batch():
    torch.manual_seed(0)
    B, C = 8, 8
    scores = torch.randn(B, C)
    valid = ~torch.eye(B, dtype=torch.bool)
    for proposal in ("batch", "permuted_scan"):
        full = mh_visit_counts(scores, beta=2.0, steps=30, burn_in=5, valid=valid, proposal=proposal,
                               generator=torch.Generator().manual_seed(7))
        parts = [mh_visit_counts(scores[lo:lo + 4], beta=2.0, steps=30, burn_in=5, valid=valid[lo:lo + 4],
                                 proposal=proposal, generator=torch.Generator().manual_seed(7), row_offset=lo,
                                 total_rows=B) for lo in (0, 4)]
        for k in range(5):
            assert torch.equal(full[k], torch.cat([p[k] for p in parts])), (proposal, k)


def test_chain_semantics_match_a_scalar_reference():
    torch.manual_seed(3)
    B, C, R, P, beta = 5, 7, 40, 10, 4.0
    scores = torch.randn(B, C)
    valid = torch.rand(B, C) > 0.3
    valid[:, 0] = True
    prop = draw_mh_proposals(valid, R, generator=torch.Generator().manual_seed(0))
    ps = scores.gather(1, prop.index.t()).t().contiguous()
    init_i = torch.tensor([-1, 2, -1, 0, -1])
    init_s = torch.tensor([float("-inf"), float(scores[1, 2]), 0.3, float(scores[3, 0]), 5.0])
    res = mh_chains_torch(prop.index, ps, prop.log_u, init_i, init_s, beta, P, C)
    for i in range(B):
        cur, s, counts, stay, acc = int(init_i[i]), float(init_s[i]), torch.zeros(C), 0, 0
        for r in range(R):
            j = int(prop.index[r, i])
            if float(prop.log_u[r, i]) < beta * (float(scores[i, j]) - s):
                cur, s, acc = j, float(scores[i, j]), acc + 1
            if r >= P:
                if cur < 0:
                    stay += 1
                else:
                    counts[cur] += 1
        assert torch.equal(res.counts[i], counts) and res.stay[i] == stay and res.accepted[i] == acc
        assert res.index[i] == cur and abs(float(res.score[i]) - s) < 1e-6


@pytest.mark.parametrize("kwargs, msg", [
    (dict(steps=5, burn_in=5), "burn_in"),
    (dict(steps=0, burn_in=0), "steps"),
    (dict(steps=5, burn_in=1, beta=0.0), "beta"),
    (dict(steps=5, burn_in=1, beta=-1.0), "beta"),
])
def test_bad_arguments_are_named(kwargs, msg):
    args = dict(beta=1.0) | kwargs
    with pytest.raises(ValueError, match=msg):
        mh_visit_counts(torch.randn(3, 4), **args)


def test_all_invalid_row_is_rejected():
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[1] = False
    with pytest.raises(ValueError, match="valid"):
        mh_visit_counts(torch.randn(2, 3), beta=1.0, steps=3, burn_in=0, valid=valid)
