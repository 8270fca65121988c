"""Train a contrastive encoder: `accelerate launch scripts/train.py --config configs/X.yaml [key.sub=value ...]`.

One process: `dual-emc2-train --config configs/X.yaml [key.sub=value ...]` (console script of this module; also
`accelerate launch -m dual_emc2.cli.train ...`).
"""
from __future__ import annotations

import argparse

from dual_emc2.cli._io import fail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint path (same as train.resume=...)")
    p.add_argument("overrides", nargs="*", help="config overrides as key.sub=value")
    args = p.parse_args(argv)

    from dual_emc2.train.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return fail(e)
    from dual_emc2.train.trainer import Trainer  # one loop; the task follows cfg.mode

    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, ValueError, ImportError) as e:  # missing data/package, bad options: no traceback
        return fail(e)
    trainer.fit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
