#!/usr/bin/env python
"""Write webdataset shards: the console script `dual-emc2-make-shards` (dual_emc2.cli.make_shards)."""
from dual_emc2.cli.make_shards import main

if __name__ == "__main__":
    raise SystemExit(main())
