"""Train a contrastive encoder: `accelerate launch scripts/train.py --config configs/X.yaml [key.sub=value ...]`.

One process: `dual-emc2-train --config configs/X.yaml [key.sub=value ...]` (console script of this module; also
`accelerate launch -m dual_emc2.cli.train ...`).
"""
from __future__ import annotations

import argparse
import sys

from dual_emc2.cli._io import fail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="YAML config: a file, or a config packaged in dual_emc2/configs "
                                                    "by name (e.g. fmnist_quickstart)")
    p.add_argument("--resume", default=None, help="'latest', a checkpoint file or a run folder (same as "
                                                  "train.resume=...)")
    p.add_argument("--allow-changes", action="store_true",
                   help="let a resumed run apply changed optim.*, loss.options.*, mixed precision or compile "
                        "(same as train.allow_changes=true)")
    p.add_argument("overrides", nargs="*", help="config overrides as key.sub=value")
    args = p.parse_intermixed_args(argv)  # overrides may sit before and after --resume

    from dual_emc2.errors import DualEMC2Error, Interrupted
    from dual_emc2.train.config import load_config

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    overrides += ["train.allow_changes=true"] if args.allow_changes else []
    try:
        cfg = load_config(args.config, overrides)
        from dual_emc2.train.trainer import Trainer  # one loop; the task follows cfg.mode

        trainer = Trainer(cfg)
        trainer.fit()
    except Interrupted as e:  # a checkpoint was written; the message says how to resume
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except (DualEMC2Error, FileNotFoundError, ValueError, ImportError, UnicodeDecodeError) as e:
        return fail(e)  # one line on stderr, no traceback; the exit code of the error's kind
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
