"""What a run folder may be used for: a new run, or the continuation of the run it holds.

* A folder that already holds a run (``config.yaml``, ``metrics.csv`` or checkpoints) is never started over: without
  ``--resume`` the trainer refuses and names both ways on (resume, or another ``output_dir``).
* ``--resume latest`` in a folder with no run starts one (so a job script can always pass it) and says so; in a folder
  whose checkpoints are all corrupt, or that holds logs but no checkpoint, it refuses.
* A resumed run may change only what does not change the run it continues (:data:`FREE_KEYS`: length, logging,
  checkpointing, evaluation, loader workers, the estimator state's layout); the optimisation keys (:data:`FLAG_KEYS`)
  change only with ``train.allow_changes=true`` (``--allow-changes``); everything else (data, model, estimator,
  batch size, seed, mode) is refused, every difference listed in one message.  A longer run rebuilds the schedule
  for the new end.
* The number of processes may change (elastic resume) when the global batch, ``train.batch_size`` × processes, does
  not: 2 × 16 may resume as 1 × 32 or 4 × 8.  Global batches do not depend on the split over processes
  (:class:`~dual_emc2.data.samplers.GlobalBatchSampler`), so the continued run sees the batches the checkpointed run
  would have seen.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dual_emc2.errors import CheckpointError
from dual_emc2.train.checkpoint import list_checkpoints

__all__ = ["FLAG_KEYS", "FREE_KEYS", "check_new_run", "check_resume_config", "config_differences", "holds_a_run"]

# keys a resumed run may change freely: how long it trains, how it logs, checkpoints and evaluates
FREE_KEYS = ("output_dir", "train.resume", "train.epochs", "train.max_steps", "train.log_every", "train.ckpt_every",
             "train.keep_last", "train.plots", "train.dist_timeout_s", "train.max_nonfinite", "train.allow_changes",
             "data.num_workers", "data.download", "eval.", "loss.state_sharding")
# keys that change the optimisation of the continued run: only with train.allow_changes=true
FLAG_KEYS = ("optim.", "train.mixed_precision", "train.compile", "loss.options.")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two config dicts, sorted by key;
    a key missing on one side (an older checkpoint) reads as ``<unset>``."""
    a, b = _flatten(old), _flatten(new)
    missing = "<unset>"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) !=
            b.get(k, missing)]


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _global_batch(cfg: Mapping[str, Any], world: int) -> int | None:
    batch = cfg.get("train", {}).get("batch_size")
    return batch * world if isinstance(batch, int) else None


def _elastic(old: Mapping[str, Any], new: Mapping[str, Any], old_world: int | None, new_world: int | None
             ) -> tuple[list[tuple[str, Any, Any]], str]:
    """(the changes of an elastic resume, or none; why a change of the process count is refused, or "")."""
    if old_world is None or new_world is None or old_world == new_world:
        return [], ""
    before, after = _global_batch(old, old_world), _global_batch(new, new_world)
    if before is not None and before == after:
        return [("processes", old_world, new_world)], ""
    fix = (f"train.batch_size={before // new_world}" if before is not None and before % new_world == 0 else
           f"a number of processes that divides {before}")
    return [], (f"processes: {old_world} → {new_world} changes the global batch (train.batch_size × processes) from "
                f"{before} to {after}; resume on {new_world} processes with {fix} to keep it")


def check_resume_config(old: Mapping[str, Any], new: Mapping[str, Any], checkpoint: Path,
                        allow_changes: bool, old_world: int | None = None, new_world: int | None = None
                        ) -> list[tuple[str, Any, Any]]:
    """The differences a resume from ``checkpoint`` (config ``old``, saved by ``old_world`` processes) with config
    ``new`` on ``new_world`` processes applies; raises :class:`CheckpointError` listing every difference it may not
    apply.  ``train.batch_size`` may change when the number of processes changes and the global batch does not."""
    diffs = [d for d in config_differences(old, new) if not _matches(d[0], FREE_KEYS)]
    elastic, refused = _elastic(old, new, old_world, new_world)
    if elastic:
        elastic += [d for d in diffs if d[0] == "train.batch_size"]
        diffs = [d for d in diffs if d[0] != "train.batch_size"]
    streamed = bool(new.get("pairs", {}).get("streaming")) and new.get("mode") == "bimodal"
    if streamed:  # the stream's split over ranks × workers is part of the position (dual_emc2.data.shards)
        workers = [d for d in config_differences(old, new) if d[0] == "data.num_workers"]
        diffs += workers
        if old_world is not None and new_world is not None and old_world != new_world:
            elastic, refused = [], f"processes: {old_world} → {new_world} (a streamed run resumes on as many)"
    never = [d for d in diffs if not _matches(d[0], FLAG_KEYS)]
    flagged = [d for d in diffs if _matches(d[0], FLAG_KEYS)]
    listing = "; ".join([f"{k}: {a!r} → {b!r}" for k, a, b in never + (flagged if not allow_changes else [])]
                        + ([refused] if refused else []))
    if never or refused:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: the run's config differs in keys a resumed run cannot change "
            f"({listing}). Resume with the checkpoint's values (drop those overrides), or start a new run in another "
            "output_dir")
    if flagged and not allow_changes:
        raise CheckpointError(
            f"resuming from {checkpoint} would change the optimisation of the run ({listing}); pass --allow-changes "
            "(train.allow_changes=true) to apply the new values from here on, or drop those overrides")
    return elastic + flagged


def holds_a_run(out: Path) -> list[str]:
    """What in ``out`` shows that it holds a run (empty: a new run may start there)."""
    found = [name for name in ("config.yaml", "metrics.csv", "final_metrics.json") if (out / name).is_file()]
    ckpts = list_checkpoints(out / "checkpoints") if (out / "checkpoints").is_dir() else []
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint{'s' if len(ckpts) > 1 else ''} (last: step {ckpts[-1][0]})")
    return found


def _free_name(out: Path) -> Path:
    return next(p for p in (out.with_name(f"{out.name}-{i}") for i in itertools.count(2)) if not p.exists())


def check_new_run(out: Path, resume: str | None) -> None:
    """Refuse to start a new run (``resume`` None) in a folder that holds one; for ``resume="latest"`` the caller has
    found no valid checkpoint: refuse when the folder holds a run anyway (corrupt checkpoints, or logs only)."""
    found = holds_a_run(out)
    if not found:
        return
    what = ", ".join(found)
    if resume is None:
        raise CheckpointError(
            f"output_dir {out} already holds a run ({what}); continue it with --resume latest "
            f"(train.resume=latest), or start a new run in another folder, e.g. output_dir={_free_name(out)}")
    raise CheckpointError(
        f"--resume {resume}: {out} holds a run ({what}) but no intact checkpoint to continue it from (see the "
        f"warnings above for each file); start a new run in another folder, e.g. output_dir={_free_name(out)}, or "
        "resume from a specific checkpoint file with --resume PATH")
