"""Spectral batches and supervised losses inside the trainer: spectral batches (refresh, plan, exact resume), supervised
estimators fed the right labels, geometry metrics and the spectrum plot at evaluation."""
import pytest
import torch

from dual_emc2.data.spectral import SpectralBatchSampler
from dual_emc2.train.checkpoint import find_latest_valid, load_checkpoint
from dual_emc2.train.trainer import Trainer
from tests.test_trainer import _flat_state, tiny_config

pytestmark = pytest.mark.slow  # trains through the CLI or starts processes: `make test-fast` skips it

SPECTRAL = ["data.batch_sampler=spectral", "data.spectral.refresh_every=3", "data.spectral.num_clusters=6"]


class Recording(Trainer):
    """Records the global ids of every micro-batch it trains on, with the step it belongs to."""

    def train_step(self, item):
        self.seen = getattr(self, "seen", [])
        self.seen.append((self.pos.step, item[0].tolist()))
        return super().train_step(item)


def test_spectral_batches_follow_the_clusters_of_each_refresh(tmp_path):
    t = Recording(tiny_config(tmp_path, *SPECTRAL, "eval.enabled=false"))
    assert isinstance(t.sampler, SpectralBatchSampler)
    refreshes = []
    orig = t.refresh_batches

    def spy():
        s = orig()
        refreshes.append((t.pos.step, t.sampler.assignment.clone()))
        return s

    t.refresh_batches = spy
    t.fit()
    # 96 images / 16 = 6 steps an epoch, 12 steps: refreshes before steps 0, 3, 6, 9
    assert [s for s, _ in refreshes] == [0, 3, 6, 9]
    assert t.sampler.refreshes == 4
    assert len(t.seen) == 12 and sorted(sum((ids for _, ids in t.seen[:6]), [])) == list(range(96))
    assert sorted(sum((ids for _, ids in t.seen[6:]), [])) == list(range(96))  # each image once an epoch
    # a batch trained after a refresh is cut from that refresh's clusters: at most two clusters (a whole cluster
    # of 16, or the leftovers of neighbouring clusters) and mostly one
    purity, chance = [], []
    g = torch.Generator().manual_seed(0)
    for step, ids in t.seen:
        assignment = [a for s, a in refreshes if s <= step][-1]
        purity.append(int(torch.bincount(assignment[torch.tensor(ids)]).max()) / len(ids))
        for _ in range(20):  # the same clusters, uniformly shuffled batches
            rand = torch.randperm(96, generator=g)[:16]
            chance.append(int(torch.bincount(assignment[rand]).max()) / 16)
    assert sum(purity) / len(purity) > 0.6 > sum(chance) / len(chance) + 0.15
    ckpt = load_checkpoint(find_latest_valid(tmp_path / "checkpoints"))
    assert ckpt["sampler"]["refreshes"] == 4


class Crash(RuntimeError):
    pass


@pytest.mark.determinism
def test_spectral_run_resumes_bit_identically(tmp_path):
    full = Recording(tiny_config(tmp_path / "full", *SPECTRAL, "eval.enabled=false"))
    full.fit()

    class Crashing(Recording):
        def train_step(self, item):
            if self.pos.step == 10:  # after the step-8 checkpoint and the step-9 refresh
                raise Crash()
            return super().train_step(item)

    with pytest.raises(Crash):
        Crashing(tiny_config(tmp_path / "cut", *SPECTRAL, "eval.enabled=false")).fit()
    resumed = Recording(tiny_config(tmp_path / "cut", *SPECTRAL, "eval.enabled=false", "train.resume=latest"))
    resumed.fit()
    assert resumed.seen == [x for x in full.seen if x[0] >= 8]  # same batches from the checkpoint on
    ref, got = _flat_state(full.state_payload()), _flat_state(resumed.state_payload())
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert torch.equal(resumed.sampler.assignment, full.sampler.assignment)


def test_resuming_a_shuffle_checkpoint_with_spectral_batches_is_refused(tmp_path):
    Trainer(tiny_config(tmp_path, "eval.enabled=false", "train.max_steps=4")).fit()
    t = Trainer(tiny_config(tmp_path, *SPECTRAL, "eval.enabled=false", "train.resume=latest"))
    with pytest.raises(ValueError, match="data.batch_sampler: 'shuffle' → 'spectral'"):
        t.fit()  # the config check names the change before any state is loaded


@pytest.mark.parametrize("name", ["scl", "hscl"])
def test_supervised_estimators_get_the_labels_of_their_images(tmp_path, name):
    t = Trainer(tiny_config(tmp_path, f"loss.estimator={name}", "eval.enabled=false", "train.max_steps=3"))
    base = t.task.train_set.dataset.base  # SeededViews → MultiViewDataset → the first 96 digits
    labels_of = torch.tensor([int(base[i][1]) for i in range(96)])
    seen = []
    forward = t.estimator.forward

    def spy(batch, beta, **kw):
        seen.append((batch.anchor_ids.clone(), batch.labels.clone(), batch.candidate_ids.clone(),
                     batch.candidate_labels.clone()))
        return forward(batch, beta, **kw)

    t.estimator.forward = spy
    final = t.fit()
    assert final["step"] == 3 and len(seen) == 3
    for aid, al, cid, cl in seen:
        assert torch.equal(al, labels_of[aid]) and torch.equal(cl, labels_of[cid])
        assert al.unique().numel() > 1  # digits: several classes in a batch of 16 images


def test_unsupervised_estimator_is_not_handed_labels(tmp_path):
    t = Trainer(tiny_config(tmp_path, "eval.enabled=false", "train.max_steps=1"))
    seen = []
    forward = t.estimator.forward
    t.estimator.forward = lambda batch, beta, **kw: (seen.append(batch.labels), forward(batch, beta, **kw))[1]
    t.fit()
    assert seen == [None]


def test_evaluation_logs_geometry_and_plots_the_spectrum(tmp_path):
    final = Trainer(tiny_config(tmp_path, "train.epochs=1")).fit()
    for key in ("geo_effective_rank", "geo_nc1", "geo_etf_distance", "geo_uniformity"):
        assert key in final
    assert 1.0 <= final["geo_effective_rank"] <= 512 and final["geo_nc1"] > 0 and final["geo_uniformity"] < 0
    assert (tmp_path / "plots" / "spectrum.png").stat().st_size > 1000
    off = Trainer(tiny_config(tmp_path / "off", "train.epochs=1", "eval.geometry=false")).fit()
    assert not any(k.startswith("geo_") for k in off)
