"""Summarise a checkpoint: step, config, tensor sizes and a hash of the parameters and of each estimator state.

    dual-emc2-checkpoint-info runs/x/checkpoints/ckpt-00000200.pt [--json]
    dual-emc2-checkpoint-info runs/x                      # a run folder: its newest intact checkpoint
    dual-emc2-checkpoint-info runs/x/checkpoints/latest   # the same
    python scripts/checkpoint_info.py runs/x/checkpoints/ckpt-00000200.pt [--json]     # the same tool

Two runs whose hashes agree have bit-identical parameters / optimiser / estimator states.  A checkpoint whose
estimator state is sharded over processes (``loss.state_sharding``) is read with all its shard files and hashed
as the whole state, so a sharded and a replicated run of the same training print the same hashes.
"""
from __future__ import annotations

import argparse
import json

from dual_emc2.cli._io import USER_ERRORS, fail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint file, run folder, checkpoints folder, or checkpoints/latest")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    from dual_emc2.train.checkpoint import checkpoint_summary, load_checkpoint, resolve_checkpoint, tensor_dict_sha256
    from dual_emc2.train.checkpoint_shards import load_estimator_state

    try:
        path = resolve_checkpoint(args.checkpoint)
        payload = load_checkpoint(path)
        estimator = load_estimator_state(path, payload)
    except USER_ERRORS as e:
        return fail(e)
    shards = payload.pop("state_shards", None)
    summary = checkpoint_summary({**payload, "estimator": estimator})
    groups: dict[str, dict] = {}
    for k, v in estimator.items():
        groups.setdefault(k.rsplit(".", 1)[0] if "." in k else k, {})[k] = v
    info = {
        "checkpoint": str(path), "step": payload.get("step"), "epoch": payload.get("epoch"),
        "batch_in_epoch": payload.get("batch_in_epoch"), "world_size": payload.get("world_size"),
        "estimator": payload.get("config", {}).get("loss", {}).get("estimator"),
        "hash": {"model": tensor_dict_sha256(payload.get("model", {})),
                 "optimizer": tensor_dict_sha256(payload.get("optimizer", {})),
                 "estimator": tensor_dict_sha256(estimator),
                 **{f"estimator/{g}": tensor_dict_sha256(t) for g, t in sorted(groups.items())}},
        "sizes": {k: {"tensors": v["num_tensors"], "elements": v["numel"], "bytes": v["nbytes"]}
                  for k, v in summary["tensors"].items()},
        "state": {"layout": "replicated"} if shards is None else {
            "layout": "sharded", "world_size": shards["world_size"],
            "files": [{"name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in shards["files"]]},
        "config": payload.get("config"),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"checkpoint  {path}")
    print(f"step {info['step']}  epoch {info['epoch']}  batch {info['batch_in_epoch']}  "
          f"processes {info['world_size']}  estimator {info['estimator']}")
    if shards is not None:
        total = sum(f["bytes"] for f in shards["files"])
        print(f"estimator state sharded over {shards['world_size']} processes: {len(shards['files'])} shard files, "
              f"{total} bytes (hashed as the whole state)")
    print(f"{'part':<34}{'sha256':<20}")
    for k, h in info["hash"].items():
        print(f"{k:<34}{h[:16]}")
    print(f"{'part':<20}{'tensors':>10}{'elements':>14}{'bytes':>14}")
    for k, v in info["sizes"].items():
        print(f"{k:<20}{v['tensors'] or 0:>10}{v['elements'] or 0:>14}{v['bytes'] or 0:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
