"""Checkpoints of estimator state sharded over processes (``loss.state_sharding``), and loading them at any
number of processes.

Layout of a checkpoint saved by ``W`` processes whose estimator state is sharded::

    ckpt-00000200.pt                          model, optimiser, ..., the estimator's common entries, + manifest
    ckpt-00000200.shard-00000-of-00002.pt     process 0's rows of every sharded table
    ckpt-00000200.shard-00001-of-00002.pt     process 1's rows

Every file has the checkpoint format of :mod:`dual_emc2.train.checkpoint` (written atomically, sha256 in its header).
Saving: every process writes its shard, all wait, then the main process reads the shards' headers into the manifest
(name, length, sha256 of each) and writes the main file last: a crash before it leaves no checkpoint (orphan shards
are pruned by the next save), and a checkpoint whose shard is missing, damaged or replaced fails verification
naming that file.  Loading: each process reads only the shards that hold rows of the keys it now owns
(:meth:`dual_emc2.loss.state.layout.KeyLayout.sources`: its own at the same size, one when the size doubles, all when it
holds every row).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dual_emc2.errors import CheckpointError
from dual_emc2.loss.state.keyed import assemble_state_dict, keyed_states, load_state_shards
from dual_emc2.train.checkpoint import (
    CheckpointCorrupt,
    check_shard_digest,
    file_digest,
    load_checkpoint,
    shard_file,
    write_checkpoint_file,
)

__all__ = ["load_estimator_state", "restore_estimator", "save_state_shard", "shard_manifest", "shard_name"]


def shard_name(step: int, rank: int, world: int) -> str:
    """File name of process ``rank``'s shard of the checkpoint of ``step`` saved by ``world`` processes."""
    return f"ckpt-{int(step):08d}.shard-{rank:05d}-of-{world:05d}.pt"


def save_state_shard(directory: str | os.PathLike[str], step: int, rank: int, world: int,
                     state: Mapping[str, Tensor]) -> Path:
    """Atomically write this process's rows of the sharded tables (``state``: the sharded part of the estimator's
    state dict, :func:`dual_emc2.loss.state.keyed.split_sharded_state`)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    payload = {"step": step, "rank": rank, "world_size": world, "estimator": dict(state)}
    return write_checkpoint_file(root / shard_name(step, rank, world), payload)


def shard_manifest(directory: str | os.PathLike[str], step: int, world: int) -> dict[str, Any]:
    """The manifest of the ``world`` shards of ``step`` written in ``directory`` (each file's length and sha256 from
    its header); a missing shard is a :class:`CheckpointError` naming it."""
    files = []
    for r in range(world):
        path = Path(directory) / shard_name(step, r, world)
        if not path.is_file():
            raise CheckpointError(f"{path}: process {r} wrote no state shard; is the checkpoint folder on a file "
                                  "system every process sees?")
        length, digest = file_digest(path)
        files.append({"rank": r, "name": path.name, "bytes": length, "sha256": digest})
    return {"step": step, "world_size": world, "files": files}


def _entries(path: Path, manifest: Mapping[str, Any]) -> dict[int, Mapping[str, Any]]:
    world = manifest.get("world_size")
    entries = {int(e.get("rank", -1)): e for e in manifest["files"]}
    if not isinstance(world, int) or sorted(entries) != list(range(world)):
        raise CheckpointCorrupt(f"{path}: the shard manifest does not list one shard per process ({manifest})")
    return entries


def _load_shard(main: Path, entry: Mapping[str, Any]) -> dict[str, Tensor]:
    """The estimator entries of one shard: the file verified, and checked to be the one the manifest names."""
    path = shard_file(main, entry)
    if not path.is_file():
        raise CheckpointCorrupt(f"{path}: state shard missing (checkpoint {main.name} is sharded over processes and "
                                "needs every shard file beside it)")
    check_shard_digest(main, entry, path)
    payload = load_checkpoint(path, map_location="cpu")
    if payload.get("rank") != entry.get("rank") or not isinstance(payload.get("estimator"), Mapping):
        raise CheckpointCorrupt(f"{path}: not the shard of process {entry.get('rank')} of {main.name}")
    return payload["estimator"]


def _pieces(main: Path, manifest: Mapping[str, Any], ranks: list[int]) -> Iterator[dict[str, Tensor]]:
    entries = _entries(main, manifest)
    for r in ranks:
        yield _load_shard(main, entries[r])


def load_estimator_state(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> dict[str, Tensor]:
    """The whole estimator state of a loaded checkpoint in the replicated layout (every shard assembled; the
    ``estimator`` entry itself for a checkpoint without shards), e.g. to hash or inspect it."""
    manifest = payload.get("state_shards")
    common = dict(payload.get("estimator", {}))
    if manifest is None:
        return common
    main = Path(path)
    try:
        return assemble_state_dict(common, _pieces(main, manifest, sorted(_entries(main, manifest))))
    except CheckpointError:
        raise
    except ValueError as exc:
        raise CheckpointCorrupt(f"{main}: {exc}") from None


def restore_estimator(estimator: nn.Module, path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Load the estimator state of checkpoint ``path`` (loaded as ``payload``) into ``estimator``, whatever the
    layouts and numbers of processes of the saving and the loading run; reads only the shards it needs."""
    manifest = payload.get("state_shards")
    if manifest is None:
        estimator.load_state_dict(payload["estimator"])
        return
    main = Path(path)
    world = int(manifest.get("world_size", 0))
    ranks = sorted({r for table in keyed_states(estimator).values() for r in table.layout.sources(world)})
    try:
        load_state_shards(estimator, payload["estimator"], _pieces(main, manifest, ranks))
    except CheckpointError:
        raise
    except ValueError as exc:
        raise CheckpointError(f"{main}: its estimator state does not fit this run ({exc})") from None
