"""Sharded estimator state without processes: the read/write protocol summed over simulated ranks equals the
replicated table bit for bit, layouts convert both ways (re-sharding to any number of processes reads only the shards
it needs), checkpoints of shards with a manifest verify, load and name a missing or damaged shard, and the resume
rules of an elastic run (docs/DESIGN.md, section 3)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import dual_emc2.loss.state.keyed as state_mod
from dual_emc2.errors import CheckpointError
from dual_emc2.loss.errors import OptionError
from dual_emc2.loss.estimators import EMC2, SogCLR
from dual_emc2.loss.estimators.base import ContrastiveBatch
from dual_emc2.loss.global_loss import GlobalContrastiveLoss
from dual_emc2.loss.registry import build_estimator
from dual_emc2.loss.state.exchange import owner_apply, owner_fill, pack, unpack
from dual_emc2.loss.state.keyed import (
    ChainState,
    assemble_state_dict,
    load_state_shards,
    split_sharded_state,
)
from dual_emc2.loss.state.layout import AUTO_SHARD_BYTES, KeyLayout, resolve_sharding
from dual_emc2.train.checkpoint import CheckpointCorrupt, find_latest_valid, load_checkpoint, save_checkpoint
from dual_emc2.train.checkpoint_shards import (
    load_estimator_state,
    restore_estimator,
    save_state_shard,
    shard_manifest,
)
from dual_emc2.train.run_folder import check_resume_config

N = 23  # keys: not a multiple of the world sizes below


def _table(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    key = torch.randint(-1, 50, (N,), generator=g, dtype=torch.int32)
    score = torch.randn(N, generator=g)
    score[[1, 5, 7]] = torch.tensor([-0.0, float("-inf"), float("nan")])  # bit patterns a float sum would change
    return key, score


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _as_rank(monkeypatch, r: int, W: int) -> None:
    monkeypatch.setattr(state_mod, "world_size", lambda: W)
    monkeypatch.setattr(state_mod, "rank", lambda: r)


def _sharded_chains(monkeypatch, r: int, W: int, full: tuple[torch.Tensor, torch.Tensor]) -> ChainState:
    with monkeypatch.context() as m:
        _as_rank(m, r, W)
        chains = ChainState(N, "sharded")
        chains.load_state_dict({"candidate_key": full[0], "score": full[1]})  # a replicated dict: keeps its rows
    return chains


def test_key_layout_and_auto():
    for W in (1, 2, 3, 4):
        sizes = [KeyLayout(N, W, r).local_size for r in range(W)]
        assert sum(sizes) == N and max(sizes) - min(sizes) <= 1
    for W_old in (1, 2, 3, 4, 6):  # sources: exactly the old ranks that hold some of the new rank's keys
        for W in (1, 2, 3, 4):
            for r in range(W):
                need = {k % W_old for k in range(10 * W * W_old) if k % W == r}
                assert set(KeyLayout(10 * W * W_old, W, r).sources(W_old)) == need
    assert KeyLayout(N, 4, 1).sources(2) == [1] and KeyLayout(N, 1, 0).sources(2) == [0, 1]
    assert resolve_sharding("auto", AUTO_SHARD_BYTES, 2) == "sharded"
    assert resolve_sharding("auto", AUTO_SHARD_BYTES - 1, 8) == "replicated"
    assert resolve_sharding("auto", 10 * AUTO_SHARD_BYTES, 1) == "replicated"
    with pytest.raises(ValueError, match="state_sharding must be one of"):
        resolve_sharding("shard", 1, 1)


@pytest.mark.parametrize("W", [2, 3, 4])
def test_read_protocol_summed_over_ranks_is_the_replicated_read_bitwise(W):
    key, score = _table()
    every = torch.tensor([3, 0, 22, 7, 5, 1, 12, 19, 8])  # the keys of a global batch
    total = torch.zeros((every.numel(), 2), dtype=torch.int32)
    for r in range(W):  # the all-reduce: one process contributes a non-zero word per entry
        layout = KeyLayout(N, W, r)
        total += owner_fill([key[r::W], score[r::W]], layout, every)
    got_key, got_score = unpack(total, [torch.int32, torch.float32])
    assert torch.equal(got_key, key[every]) and torch.equal(_bits(got_score), _bits(score[every]))


@pytest.mark.parametrize("W", [2, 3, 4])
def test_write_protocol_keeps_each_owners_rows_as_the_replicated_write(W):
    key, score = _table()
    every = torch.tensor([4, 9, 0, 22, 13, 1])
    new = pack([torch.arange(6, dtype=torch.int32) + 100, torch.tensor([0.5, -0.0, float("nan"), 2.0, -1.0, 3.0])])
    ref_key, ref_score = key.clone(), score.clone()
    owner_apply([ref_key, ref_score], KeyLayout(N), every, new)  # replicated: every row applied
    shards = [[key[r::W].clone(), score[r::W].clone()] for r in range(W)]
    for r in range(W):
        owner_apply(shards[r], KeyLayout(N, W, r), every, new)
    got_key, got_score = torch.empty_like(key), torch.empty_like(score)
    for r in range(W):
        got_key[r::W], got_score[r::W] = shards[r]
    assert torch.equal(got_key, ref_key) and torch.equal(_bits(got_score), _bits(ref_score))


def _unimodal_batch(step: int, b: int = 4, d: int = 8):
    g = torch.Generator().manual_seed(step)
    feats = F.normalize(torch.randn(2 * b, d, generator=g), dim=1).requires_grad_(True)
    ids = torch.randperm(N // 2, generator=g)[:b]
    keys = torch.cat([ids * 2, ids * 2 + 1])
    table = F.normalize(torch.randn(N, d, generator=torch.Generator().manual_seed(99)), dim=1)
    return ContrastiveBatch(feats, feats, torch.cat([torch.arange(b, 2 * b), torch.arange(b)]), ids.repeat(2),
                            ids.repeat(2), anchor_keys=keys, candidate_keys=keys, views_per_id=2,
                            encode_candidates=lambda i: table[i])


@pytest.mark.parametrize("cls", [EMC2, SogCLR])
@pytest.mark.determinism
def test_one_process_sharded_trains_as_replicated(cls):
    runs = {}
    for mode in ("replicated", "sharded"):
        est = cls(num_keys=N, seed=1, state_sharding=mode) if cls is EMC2 else cls(num_keys=N, state_sharding=mode)
        losses = [est(_unimodal_batch(step), 4.0).loss.detach() for step in range(4)]
        runs[mode] = (losses, est.state_dict())
    (l_rep, s_rep), (l_sh, s_sh) = runs["replicated"], runs["sharded"]
    assert all(torch.equal(a, b) for a, b in zip(l_rep, l_sh))
    assert [k for k in s_sh if k.endswith("shard")] and not [k for k in s_rep if k.endswith("shard")]
    common, pieces = split_sharded_state(est, s_sh)
    full = assemble_state_dict(common, [pieces])
    assert full.keys() == s_rep.keys() and all(torch.equal(_bits(full[k]) if full[k].is_floating_point() else
                                                           full[k], _bits(v) if v.is_floating_point() else v)
                                               for k, v in s_rep.items())


@pytest.mark.parametrize("W_old, W_new", [(2, 1), (2, 4), (2, 3), (4, 2), (3, 3)])
def test_reshard_to_any_number_of_processes_reads_only_the_shards_it_needs(monkeypatch, W_old, W_new):
    full = _table(1)
    old = [_sharded_chains(monkeypatch, r, W_old, full) for r in range(W_old)]
    pieces = [o.state_dict() for o in old]
    assert all(torch.equal(p["shard"], torch.tensor([r, W_old, N])) for r, p in enumerate(pieces))
    assembled = assemble_state_dict({}, pieces)
    assert torch.equal(assembled["candidate_key"], full[0]) and torch.equal(_bits(assembled["score"]), _bits(full[1]))
    for r in range(W_new):
        new = _sharded_chains(monkeypatch, r, W_new, (torch.zeros(N, dtype=torch.int32), torch.zeros(N)))
        read = []
        load_state_shards(new, {}, (read.append(q) or pieces[q] for q in new.layout.sources(W_old)))
        assert len(read) == W_old // math.gcd(W_old, W_new)
        assert torch.equal(new.candidate_key, full[0][r::W_new])
        assert torch.equal(_bits(new.score), _bits(full[1][r::W_new]))
    replicated = ChainState(N, "replicated")
    load_state_shards(replicated, {}, pieces)
    assert torch.equal(replicated.candidate_key, full[0])


def test_layout_errors_are_clear(monkeypatch):
    full = _table(2)
    piece = _sharded_chains(monkeypatch, 1, 2, full).state_dict()
    with pytest.raises(RuntimeError, match="shard 1 of 2, which lacks rows"):
        ChainState(N, "replicated").load_state_dict(piece)
    with pytest.raises(ValueError, match="hold 0 of the 12 rows"):
        load_state_shards(_sharded_chains(monkeypatch, 0, 2, full), {}, [piece])
    with pytest.raises(ValueError, match=r"shards \[0\] of 2 are missing"):
        assemble_state_dict({}, [piece])
    with pytest.raises(RuntimeError, match="state dict holds 30 keys, this table has 23"):
        ChainState(N, "sharded").load_state_dict({"candidate_key": torch.zeros(30, dtype=torch.int32),
                                                  "score": torch.zeros(30)})
    with monkeypatch.context() as m:
        _as_rank(m, 0, 2)
        chains = ChainState(N, "sharded")
    with pytest.raises(RuntimeError, match="sharded over 2 processes but 1 are running"):
        chains.read(torch.tensor([0]))


def test_sharding_is_one_config_key_and_a_loss_option():
    with pytest.raises(OptionError, match="loss.state_sharding"):
        build_estimator("emc2", num_keys=4, num_candidates=2, options={"state_sharding": "sharded"})
    with pytest.raises(OptionError, match="must be one of auto, replicated, sharded"):
        build_estimator("emc2", num_keys=4, num_candidates=2, state_sharding="yes")
    sym = build_estimator("sogclr", num_keys=4, num_candidates=4, symmetric=True, state_sharding="sharded")
    assert sym.x_to_y.u.sharding == sym.y_to_x.u.sharding == "sharded"
    assert build_estimator("infonce", num_keys=4, num_candidates=4, state_sharding="sharded") is not None
    loss = GlobalContrastiveLoss("emc2", 10, state_sharding="sharded", state_score="stale", out_of_batch="drop")
    assert loss.estimator.x_to_y.chains.sharding == "sharded"
    assert loss.state_dict()["estimator.x_to_y.chains.shard"].tolist() == [0, 1, 10]  # rank, world, keys


# ---------------------------------------------------------------------------------------------------- checkpoints


def _save_sharded(monkeypatch, folder, step, W, full, extra_common=None):
    """What W processes of a sharded run write: W shards, then the main file with the manifest."""
    common = {"iteration": torch.tensor(step)} | (extra_common or {})
    for r in range(W):
        with monkeypatch.context() as m:
            _as_rank(m, r, W)
            est = EMC2(num_keys=N, state_sharding="sharded")
            est.chains.load_state_dict({"candidate_key": full[0], "score": full[1]})
        _, sharded = split_sharded_state(est, est.state_dict())
        save_state_shard(folder, step, r, W, sharded)
    payload = {"step": step, "model": {"w": torch.ones(3)}, "estimator": common, "world_size": W}
    return save_checkpoint(folder, step, payload, keep_last=2, manifest=shard_manifest(folder, step, W))


def test_sharded_checkpoint_layout_loads_whole_and_at_any_size(monkeypatch, tmp_path):
    full = _table(3)
    path = _save_sharded(monkeypatch, tmp_path, 5, 2, full)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-00000005.pt", "ckpt-00000005.shard-00000-of-00002.pt",
                     "ckpt-00000005.shard-00001-of-00002.pt", "latest"]
    payload = load_checkpoint(path)
    assert payload["state_shards"]["world_size"] == 2 and len(payload["state_shards"]["files"]) == 2
    assert set(payload["estimator"]) == {"iteration"}  # the rows live in the shards only
    whole = load_estimator_state(path, payload)
    ref = EMC2(num_keys=N, state_sharding="replicated")
    ref.chains.load_state_dict({"candidate_key": full[0], "score": full[1]})
    ref.iteration.fill_(5)
    assert whole.keys() == ref.state_dict().keys()
    assert all(torch.equal(_bits(whole[k]) if v.is_floating_point() else whole[k],
                           _bits(v) if v.is_floating_point() else v) for k, v in ref.state_dict().items())
    for W_new, r in ((1, 0), (4, 3)):  # restore at another number of processes
        with monkeypatch.context() as m:
            _as_rank(m, r, W_new)
            est = EMC2(num_keys=N, state_sharding="sharded")
        restore_estimator(est, path, payload)
        assert int(est.iteration) == 5 and est._iteration == 5
        assert torch.equal(est.chains.candidate_key, full[0][r::W_new])
    replicated = EMC2(num_keys=N, state_sharding="replicated")
    restore_estimator(replicated, path, payload)
    assert torch.equal(replicated.chains.candidate_key, full[0])


def test_checkpoint_info_hashes_a_sharded_checkpoint_as_the_whole_state(monkeypatch, tmp_path, capsys):
    import json

    from dual_emc2.cli import checkpoint_info

    full = _table(4)
    sharded = _save_sharded(monkeypatch, tmp_path / "sharded", 2, 2, full)
    ref = EMC2(num_keys=N, state_sharding="replicated")
    ref.chains.load_state_dict({"candidate_key": full[0], "score": full[1]})
    ref.iteration.fill_(2)
    replicated = save_checkpoint(tmp_path / "replicated", 2, {"step": 2, "model": {"w": torch.ones(3)},
                                                              "estimator": ref.state_dict(), "world_size": 2})
    infos = []
    for path in (sharded, replicated):
        assert checkpoint_info.main([str(path), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    assert infos[0]["hash"] == infos[1]["hash"]
    assert infos[0]["state"]["layout"] == "sharded" and len(infos[0]["state"]["files"]) == 2
    assert infos[1]["state"] == {"layout": "replicated"}
    assert checkpoint_info.main([str(sharded)]) == 0
    assert "sharded over 2 processes: 2 shard files" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["missing", "bit_flip", "other_save"])
def test_a_missing_or_damaged_shard_is_a_checkpoint_error_naming_it(monkeypatch, tmp_path, damage):
    full = _table(5)
    good = _save_sharded(monkeypatch, tmp_path, 1, 2, full)
    bad = _save_sharded(monkeypatch, tmp_path, 2, 2, full)
    shard = tmp_path / "ckpt-00000002.shard-00001-of-00002.pt"
    if damage == "missing":
        shard.unlink()
    elif damage == "bit_flip":
        raw = bytearray(shard.read_bytes())
        raw[-10] ^= 0x01
        shard.write_bytes(bytes(raw))
    else:  # a valid shard, but not the one this checkpoint was saved with
        shard.write_bytes((tmp_path / "ckpt-00000001.shard-00001-of-00002.pt").read_bytes())
    with pytest.raises(CheckpointCorrupt, match=str(shard)) as e:
        load_estimator_state(bad, load_checkpoint(bad))
    assert isinstance(e.value, CheckpointError)
    with pytest.raises(CheckpointCorrupt, match=str(shard)):
        restore_estimator(EMC2(num_keys=N, state_sharding="replicated"), bad, load_checkpoint(bad))
    with pytest.warns(UserWarning, match=str(shard)):
        assert find_latest_valid(tmp_path) == good


def test_pruning_removes_the_shards_of_pruned_checkpoints_and_orphans(monkeypatch, tmp_path):
    full = _table(6)
    save_state_shard(tmp_path, 1, 0, 2, {"x": torch.zeros(1)})  # an orphan: its main file was never written
    for step in (2, 3, 4):
        _save_sharded(monkeypatch, tmp_path, step, 2, full)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "latest")
    assert names == [f"ckpt-0000000{s}{suffix}" for s in (3, 4)
                     for suffix in (".pt", ".shard-00000-of-00002.pt", ".shard-00001-of-00002.pt")]


def test_elastic_resume_keeps_the_global_batch():
    cfg = {"train": {"batch_size": 4}, "loss": {"state_sharding": "sharded"}}
    same = copy.deepcopy(cfg)
    assert check_resume_config(cfg, same, "ck", False, 2, 2) == []
    four = copy.deepcopy(cfg)
    four["train"]["batch_size"] = 2
    four["loss"]["state_sharding"] = "replicated"  # a free key: the layout changes nothing
    assert check_resume_config(cfg, four, "ck", False, 2, 4) == [("processes", 2, 4), ("train.batch_size", 4, 2)]
    with pytest.raises(CheckpointError, match=r"processes: 2 → 4 changes the global batch .* from 8 to 16; resume "
                                              r"on 4 processes with train.batch_size=2"):
        check_resume_config(cfg, same, "ck", False, 2, 4)
    with pytest.raises(CheckpointError, match=r"train.batch_size: 4 → 3.*a number of processes that divides 8"):
        three = copy.deepcopy(cfg)
        three["train"]["batch_size"] = 3
        check_resume_config(cfg, three, "ck", False, 2, 3)
    with pytest.raises(CheckpointError, match=r"train.batch_size: 4 → 8"):  # same processes: the batch is fixed
        eight = copy.deepcopy(cfg)
        eight["train"]["batch_size"] = 8
        check_resume_config(cfg, eight, "ck", False, 2, 2)
