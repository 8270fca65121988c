"""Command-line entry points (console scripts declared in setup.cfg ``[options.entry_points]``).

=============================  ===================================  =============================
console script                 module                               old path (thin wrapper)
=============================  ===================================  =============================
``dual-emc2-train``            :mod:`dual_emc2.cli.train`           ``scripts/train.py``
``dual-emc2-retrieval``        :mod:`dual_emc2.cli.retrieval`       ``eval/retrieval.py``
``dual-emc2-linear-probe``     :mod:`dual_emc2.cli.linear_probe`    ``eval/linear_probe.py``
``dual-emc2-checkpoint-info``  :mod:`dual_emc2.cli.checkpoint_info` ``scripts/checkpoint_info.py``
``dual-emc2-make-shards``      :mod:`dual_emc2.cli.make_shards`     ``scripts/make_shards.py``
=============================  ===================================  =============================

Each module has ``main(argv: list[str] | None = None) -> int``: 0 on success, 2 on a usage / data error (printed as
``error: ...`` on stderr, no traceback).
"""
