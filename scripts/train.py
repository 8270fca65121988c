#!/usr/bin/env python
"""`accelerate launch scripts/train.py --config ...`: the console script `dual-emc2-train` (dual_emc2.cli.train)."""
from dual_emc2.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
