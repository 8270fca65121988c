#!/usr/bin/env python
"""Linear probe and k-NN accuracy: the console script `dual-emc2-linear-probe` (dual_emc2.cli.linear_probe)."""
from dual_emc2.cli.linear_probe import main

if __name__ == "__main__":
    raise SystemExit(main())
