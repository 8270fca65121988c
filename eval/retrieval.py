#!/usr/bin/env python
"""Retrieval evaluation: the console script `dual-emc2-retrieval` (dual_emc2.cli.retrieval)."""
from dual_emc2.cli.retrieval import main

if __name__ == "__main__":
    raise SystemExit(main())
