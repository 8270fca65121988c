#!/usr/bin/env python
"""Summarise a checkpoint: the console script `dual-emc2-checkpoint-info` (dual_emc2.cli.checkpoint_info)."""
from dual_emc2.cli.checkpoint_info import main

if __name__ == "__main__":
    raise SystemExit(main())
