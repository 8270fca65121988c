"""Bimodal batches, rank invariance, FAISS retrieval against brute force and hand-computed values, and the bimodal
trainer end to end (tiny open_clip towers on shards): outputs, exact resume, streaming, eval/retrieval.py."""
from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dual_emc2.loss.batches as batches
from dual_emc2.data.pairs import PairSet, relevant_sets
from dual_emc2.data.shards import write_shards
from dual_emc2.loss.batches import bimodal_contrastive_batches
from dual_emc2.loss.registry import build_estimator
from dual_emc2.train.checkpoint import find_latest_valid, load_checkpoint
from dual_emc2.train.config import load_config
from dual_emc2.train.retrieval_report import retrieval_both_directions
from dual_emc2.train.trainer import Trainer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------------------------------- batches


def test_batches_pair_each_anchor_with_its_own_column_both_ways():
    zx, zy = _unit(5, 4, 0), _unit(5, 4, 1)
    ids = torch.tensor([7, 3, 9, 0, 4])
    xg = torch.tensor([0, 1, 0, 2, 3])  # pairs 0 and 2 share their x
    yg = torch.tensor([0, 1, 2, 3, 1])  # pairs 1 and 4 share their y
    xy, yx = bimodal_contrastive_batches(zx, zy, ids, x_groups=xg, y_groups=yg)
    assert xy.anchors is zx and xy.candidates is zy and yx.anchors is zy and yx.candidates is zx
    assert xy.positive.tolist() == yx.positive.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(xy.candidate_ids, ids) and torch.equal(xy.anchor_keys, ids)
    torch.testing.assert_close(xy.positive_scores(xy.scores()), (zx * zy).sum(1))
    neg = xy.negative_mask
    assert not neg.diagonal().any()
    assert not neg[0, 2] and not neg[2, 0] and not neg[1, 4] and not neg[4, 1]  # known false negatives
    assert int(neg.sum()) == 5 * 4 - 4 and torch.equal(neg, yx.negative_mask)
    plain, _ = bimodal_contrastive_batches(zx, zy, ids)
    assert int(plain.negative_mask.sum()) == 20  # D_neg(x) = every candidate but the paired one


def _fake_world(monkeypatch, r: int, W: int, full: list[torch.Tensor]) -> None:
    """Make the batch builders see process ``r`` of ``W``: gathers return the global tensors holding the local slice."""

    def gather(t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        for f in full:
            if f.dtype == t.dtype and f.shape[1:] == t.shape[1:] and torch.equal(f[r * b:(r + 1) * b], t.detach()):
                return torch.cat([f[: r * b].detach(), t, f[(r + 1) * b:].detach()])
        raise AssertionError("gathered an unknown tensor")

    for name, value in (("rank", lambda: r), ("world_size", lambda: W), ("all_gather_rows", gather),
                        ("all_gather_with_grad", gather)):
        monkeypatch.setattr(batches, name, value)


@pytest.mark.parametrize("name", ["emc2", "sogclr"])
@pytest.mark.determinism
def test_two_processes_compute_what_one_process_does(monkeypatch, name):
    """Per-rank losses average to the single-process loss, and each rank's chain/u states equal the single-process
    ones for its anchors, over two steps (the second starting from states that point outside the batch)."""
    N, B, W = 24, 8, 2
    ids_steps = [torch.arange(B), torch.tensor([5, 17, 2, 9, 20, 11, 0, 14])]
    groups = torch.arange(N) % 10  # some duplicates: masked false negatives
    table_x, table_y = _unit(N, 6, 30), _unit(N, 6, 31)  # un-augmented features by id, for EMC²'s re-encodes
    enc = {"encode_x": lambda i: table_x[i], "encode_y": lambda i: table_y[i]}
    ref = build_estimator(name, num_keys=N, num_candidates=N, symmetric=True, options={},
                          defaults={"seed": 3, "dim": 6})
    copies = [copy.deepcopy(ref) for _ in range(W)]
    for step, ids in enumerate(ids_steps):
        zx, zy = _unit(B, 6, 10 + step), _unit(B, 6, 20 + step)
        xg, yg = groups[ids], (groups[ids] + 3) % 10
        with monkeypatch.context() as m:
            _fake_world(m, 0, 1, [zx, zy, ids, xg, yg])
            xy, yx = bimodal_contrastive_batches(zx, zy, ids, x_groups=xg, y_groups=yg, **enc)
            full_loss = ref(xy, 5.0, reverse=yx).loss
        losses = []
        for r in range(W):
            sl = slice(r * B // W, (r + 1) * B // W)
            with monkeypatch.context() as m:
                _fake_world(m, r, W, [zx, zy, ids, xg, yg])
                xy, yx = bimodal_contrastive_batches(zx[sl], zy[sl], ids[sl], x_groups=xg[sl], y_groups=yg[sl], **enc)
                assert xy.row_offset == r * B // W and xy.total_rows == B
                losses.append(copies[r](xy, 5.0, reverse=yx).loss)
        torch.testing.assert_close(torch.stack(losses).mean(), full_loss)
        # each rank holds the states of its own anchors (the real all-gather would share them)
        for r in range(W):
            own = ids[r * B // W:(r + 1) * B // W]
            for (k, v_ref), (_, v_r) in zip(ref.state_dict().items(), copies[r].state_dict().items()):
                if v_ref.dim() == 1 and v_ref.shape[0] == N and v_ref.is_floating_point():
                    # tolerance: float32 states of scores from [4, 6] × [6, 8] and [8, 6] × [6, 8] float64 products,
                    # which BLAS may round differently per shape (almost always erased by the float32 rounding)
                    torch.testing.assert_close(v_r[own], v_ref[own], rtol=1e-6, atol=1e-7, msg=k)
                elif v_ref.dim() == 1 and v_ref.shape[0] == N:  # chain keys: exact, they move only at a near-tie
                    assert torch.equal(v_ref[own], v_r[own]), k
        for c in copies:  # emulate the all-gather of state writes before the next step
            c.load_state_dict(ref.state_dict())


# ----------------------------------------------------------------------------------------------------- retrieval


def _brute_metrics(zx: np.ndarray, zy: np.ndarray, relevant: list[set[int]], ks=(1, 5, 10), nk=10) -> dict:
    out = {}
    for name, q, d in (("x2y", zx, zy), ("y2x", zy, zx)):
        order = np.argsort(-(q @ d.T), axis=1, kind="stable")
        rec = {k: [] for k in ks}
        mrr, ndcg = [], []
        for i, row in enumerate(order):
            rel = relevant[i]
            hits = [int(j in rel) for j in row]
            for k in ks:
                rec[k].append(float(any(hits[:k])))
            mrr.append(1.0 / (hits.index(1) + 1) if 1 in hits[:max(ks)] else 0.0)  # MRR@10
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits[:nk]))
            ndcg.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(rel), nk))))
        for k in ks:
            out[f"{name}_recall@{k}"] = np.mean(rec[k])
        out[f"{name}_mrr"], out[f"{name}_ndcg@{nk}"] = np.mean(mrr), np.mean(ndcg)
    return out


@pytest.mark.determinism
def test_faiss_retrieval_equals_brute_force_with_shared_queries():
    n = 80
    words = [f"lemma{i % 60}" for i in range(n)]  # 20 lemma lists shared by two synsets
    pairs = PairSet(np.arange(n), words, [f"definition {i}" for i in range(n)])
    relevant = relevant_sets(pairs)
    assert relevant[5] == {5, 65}
    zx, zy = _unit(n, 12, 0).float().numpy(), _unit(n, 12, 1).float().numpy()
    zx[65] = zx[5]  # identical text → identical query embedding
    got = retrieval_both_directions(zx, zy, relevant)
    ref = _brute_metrics(zx, zy, relevant)
    for k, v in ref.items():  # score gaps >= 5.9e-6, but for exact ties of identical embeddings (both relevant)
        assert got[k] == pytest.approx(v, abs=1e-9), k
    hnsw = retrieval_both_directions(zx, zy, relevant, index="hnsw", use_gpu=False)
    assert hnsw["x2y_recall@10"] == pytest.approx(ref["x2y_recall@10"], abs=0.05)


def test_retrieval_metrics_hand_computed_tiny_case():
    # queries 0 and 2 share their x, so documents 0 and 2 are both relevant to each of them
    relevant = relevant_sets(PairSet([0, 1, 2], ["a", "b", "a"], ["d0", "d1", "d2"]))
    zx = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], dtype=np.float32)
    zy = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # x→y rankings: q0 [1, 0, 2] (hits 0 1 1), q1 [2, 0, 1] (hits 0 0 1), q2 [0, 1, 2] (hits 1 0 1)
    m = retrieval_both_directions(zx, zy, relevant, ks=(1, 2, 3), ndcg_k=3)
    l2, l3 = 1 / math.log2(3), 1 / math.log2(4)
    assert m["x2y_recall@1"] == pytest.approx(1 / 3) and m["x2y_recall@2"] == pytest.approx(2 / 3)
    assert m["x2y_recall@3"] == pytest.approx(1.0)
    assert m["x2y_mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert m["x2y_ndcg@3"] == pytest.approx(((l2 + l3) / (1 + l2) + l3 / 1 + (1 + l3) / (1 + l2)) / 3)
    assert m["x2y_recall_all@2"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)


# ------------------------------------------------------------------------------------------------------ trainer

PALETTE = [(220, 20, 20, "red"), (20, 160, 20, "green"), (20, 20, 220, "blue"), (230, 200, 20, "yellow")]


def _shapes(n: int) -> PairSet:
    imgs, caps = [], []
    for k in range(n):
        r, g, b, name = PALETTE[k % 4]
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        size = 8 + 2 * (k // 4)
        img.paste((r, g, b), (0, 0, size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        imgs.append(buf.getvalue())
        caps.append(f"a {name} square of size {size}")
    return PairSet(np.arange(n) + 1000, imgs, caps, "image", "text", source="shapes")


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """PNG curves are tested with the unimodal trainer; drawing them here would dominate this file's runtime."""
    import dual_emc2.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "plot_curves", lambda *args, **kwargs: [])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bimodal")
    write_shards(_shapes(48), root / "shards", max_count=16)
    (root / "tiny-bimodal-clip.json").write_text(json.dumps(TINY_CLIP))
    return root


def _cfg(root: Path, out: Path, *extra: str):
    return load_config(ROOT / "configs" / "clip_scratch_webdataset.yaml", [
        f"output_dir={out}", f"towers.open_clip_model={root / 'tiny-bimodal-clip.json'}",
        f"pairs.path={root / 'shards'}", "pairs.eval_path=null", "pairs.streaming=false", "pairs.eval_size=12",
        "pairs.mask_duplicates=true", "pairs.augment_images=false", "data.num_workers=0", "train.batch_size=8",
        "train.epochs=2", "train.mixed_precision=no", "train.ckpt_every=4", "train.log_every=2",
        "eval.batch_size=16", "optim.lr=1e-3", "optim.warmup_epochs=0", *extra])


def _flat_state(payload: dict) -> dict:
    out = {f"{part}.{k}": v for part in ("model", "estimator") for k, v in payload[part].items()}
    for i, st in payload["optimizer"]["state"].items():
        out |= {f"opt.{i}.{k}": v for k, v in st.items()}
    return out


@pytest.mark.parametrize("name", ["emc2", "infonce"])
def test_trainer_writes_checkpoints_metrics_and_retrieval_eval(shard_dir, tmp_path, name):
    trainer = Trainer(_cfg(shard_dir, tmp_path, f"loss.estimator={name}"))
    assert len(trainer.task.train_pairs) == 36 and len(trainer.task.eval_pairs) == 12 and trainer.task.num_keys == 1048
    final = trainer.fit()
    assert final["step"] == 8
    for key in ("x2y_recall@1", "y2x_recall@5", "x2y_mrr", "y2x_ndcg@10"):
        assert 0.0 <= final[key] <= 1.0
    ckpt = load_checkpoint(find_latest_valid(tmp_path / "checkpoints"))
    assert ckpt["step"] == 8 and ckpt["config"]["mode"] == "bimodal"
    csv_text = (tmp_path / "metrics.csv").read_text()
    assert "pairs_per_s" in csv_text and "batch_objective" in csv_text
    assert ("x2y/state_weight" in csv_text) == (name == "emc2")
    if name == "emc2":  # chain states hold shard indices of training pairs, one table per direction
        states = ckpt["estimator"]["x_to_y.chains.candidate_key"]
        visited = set(states[states >= 0].tolist())
        assert visited and visited <= set(trainer.task.train_pairs.ids.tolist())
        assert "y_to_x.chains.candidate_key" in ckpt["estimator"]

    # eval/retrieval.py on the checkpoint rebuilds the same held-out split and reproduces the trainer's metrics
    from eval.retrieval import main as retrieval_main

    out = tmp_path / "ret.json"
    assert retrieval_main(["--checkpoint", str(find_latest_valid(tmp_path / "checkpoints")), "--split", "eval",
                           "--out", str(out), "--batch-size", "5"]) == 0
    got = json.loads(out.read_text())
    assert got["n_pairs"] == 12
    for k in ("x2y_recall@1", "x2y_mrr", "y2x_recall@5", "y2x_ndcg@10"):
        assert got["metrics"][k] == pytest.approx(final[k], abs=1e-6), k


def test_chain_states_are_the_views_the_chains_accepted_encoded_with_the_batch(shard_dir, tmp_path):
    # images augmented per (epoch, sample): each x→y chain stands on a caption, each y→x chain on an image view of an
    # earlier epoch; both go through their tower in the batch's own forward (train mode), the image bit for bit as
    # the batch of its epoch saw it
    trainer = Trainer(_cfg(shard_dir, tmp_path, "pairs.augment_images=true", "eval.enabled=false", "train.epochs=3",
                           "loss.options={}"))  # the default EMC²
    task = trainer.task
    assert task.exact_states
    forwards = {"x": [], "y": []}
    for side, tower in (("x", trainer.core.x_tower), ("y", trainer.core.y_tower)):
        tower.register_forward_hook(lambda m, inp, out, side=side: forwards[side].append((m.training, inp[0])))
    requests, batches = [], []
    request, loss = task.loss_fn.state_request, task.loss

    def spy_request(index, *, epoch=0):
        need = request(index, epoch=epoch)
        requests.append((epoch, need))
        return need

    def spy_loss(model, item):
        batches.append((item[0].clone(), task.epoch))
        return loss(model, item)

    task.loss_fn.state_request, task.loss = spy_request, spy_loss
    trainer.fit()
    assert len(batches) == len(requests) == len(forwards["x"]) == len(forwards["y"]) == 12
    seen = {"x": {}, "y": {}}
    used = 0
    for (ids, epoch), (req_epoch, need), fx, fy in zip(batches, requests, forwards["x"], forwards["y"]):
        b = ids.numel()
        assert fx[0] and fy[0] and req_epoch == epoch
        for side, inputs, states in (("x", fx[1], need.x), ("y", fy[1], need.y)):
            assert inputs.shape[0] == b + len(states)
            for k, (i, v, e) in enumerate(states):
                assert v == 0 and e < epoch
                assert torch.equal(inputs[b + k], seen[side][(i, e)]), (side, i, e)
                used += 1
            for k, i in enumerate(ids.tolist()):
                seen[side][(i, epoch)] = inputs[k]
    assert used > 0 and task.state_misses == 0


class Crash(RuntimeError):
    pass


@pytest.mark.determinism
def test_resume_after_a_crash_is_bit_identical(shard_dir, tmp_path):
    aug = "pairs.augment_images=true"  # random crops and flips are seeded per (epoch, sample)
    full = Trainer(_cfg(shard_dir, tmp_path / "full", "eval.enabled=false", aug))
    full.fit()
    ref = _flat_state(full.state_payload())

    class Crashing(Trainer):
        def train_step(self, *inputs):
            if self.pos.step == 5:  # mid-epoch 2, after the step-4 checkpoint
                raise Crash()
            return super().train_step(*inputs)

    with pytest.raises(Crash):
        Crashing(_cfg(shard_dir, tmp_path / "cut", "eval.enabled=false", aug)).fit()
    resumed = Trainer(_cfg(shard_dir, tmp_path / "cut", "eval.enabled=false", aug, "train.resume=latest"))
    resumed.fit()
    got = _flat_state(resumed.state_payload())
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


class Recording(Trainer):
    """Records the pair ids of every micro-batch; raises Crash at optimiser step ``crash_at``."""

    crash_at = -1

    def train_step(self, item):
        if self.pos.step == self.crash_at:
            raise Crash()
        self.ids.append(item[0].tolist())
        return super().train_step(item)


def _recording(cfg, crash_at: int = -1) -> Recording:
    t = Recording(cfg)
    t.ids, t.crash_at = [], crash_at
    return t


@pytest.mark.determinism
def test_streaming_resume_continues_the_stream(shard_dir, tmp_path):
    """A streamed run (6 steps an epoch) crashed at step 9 and resumed from its step-8 checkpoint (epoch 1, batch 2)
    trains on the same pairs, step by step, as the uninterrupted run, and ends bit-identical: the stream continues
    from the checkpoint's position instead of restarting."""
    opts = ("pairs.streaming=true", "pairs.mask_duplicates=false", "pairs.shuffle_buffer=8", "eval.enabled=false",
            "pairs.augment_images=true")
    full = _recording(_cfg(shard_dir, tmp_path / "full", *opts))
    full.fit()
    assert len(full.ids) == 12 and sorted(i for b in full.ids[:6] for i in b) == list(range(1000, 1048))
    with pytest.raises(Crash):
        _recording(_cfg(shard_dir, tmp_path / "cut", *opts), crash_at=9).fit()
    resumed = _recording(_cfg(shard_dir, tmp_path / "cut", *opts, "train.resume=latest"))
    resumed.fit()
    assert resumed.ids == full.ids[8:]
    ref, got = _flat_state(full.state_payload()), _flat_state(resumed.state_payload())
    assert got.keys() == ref.keys() and [k for k in ref if not torch.equal(got[k], ref[k])] == []


def test_streaming_shards_train_with_their_indices(shard_dir, tmp_path):
    cfg = _cfg(shard_dir, tmp_path, "pairs.streaming=true", f"pairs.eval_path={shard_dir / 'shards'}",
               "pairs.mask_duplicates=false", "train.max_steps=3", "pairs.shuffle_buffer=8")
    trainer = Trainer(cfg)
    assert trainer.task.train_pairs is None and trainer.steps_per_epoch == 6 and trainer.task.num_keys == 1048
    final = trainer.fit()
    assert final["step"] == 3 and len(trainer.task.eval_pairs) == 48
    states = trainer.estimator.x_to_y.chains.candidate_key
    assert set(states[states >= 0].tolist()) <= set(range(1000, 1048))
    with pytest.raises(ValueError, match="streaming shards cannot serve"):
        Trainer(_cfg(shard_dir, tmp_path / "x", "pairs.streaming=true", "pairs.mask_duplicates=false",
                            "loss.options.emc2.out_of_batch=reencode"))


def test_bad_bimodal_configs_name_the_problem(shard_dir, tmp_path):
    with pytest.raises(ValueError, match=r"pairs\.source, pairs\.path.* apply to mode: bimodal only"):
        _cfg(shard_dir, tmp_path, "mode=unimodal")  # the config names what a unimodal run would ignore
    with pytest.raises(ValueError, match="pairs.path must name the shards"):
        Trainer(_cfg(shard_dir, tmp_path, "pairs.path=null"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(_cfg(shard_dir, tmp_path, "train.batch_size=64"))
    with pytest.raises(ValueError, match="side x holds text but the x tower takes image"):
        (tmp_path / "p.csv").write_text("x,y\n" + "".join(f"q{k},d{k}\n" for k in range(30)))
        Trainer(_cfg(shard_dir, tmp_path, "pairs.source=file", f"pairs.path={tmp_path / 'p.csv'}"))
    with pytest.raises(ValueError, match="towers.shared=true needs towers.kind=pretrained"):
        Trainer(_cfg(shard_dir, tmp_path, "towers.shared=true"))
