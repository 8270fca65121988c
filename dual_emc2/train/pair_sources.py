"""Where training and held-out pairs come from: the ``pairs`` config section read into :class:`PairSet` s
(WordNet, emoji, webdataset shards or a pairs file), screened for bad samples and split."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dual_emc2.data.data_errors import DataNotFound
from dual_emc2.data.offline_sets import EMOJI_DIR, WORDNET_DIR, emoji_pairs, wordnet_pairs
from dual_emc2.data.pairs import PairSet, read_pairs_file, screen_pairs, split_pairs
from dual_emc2.data.shards import read_shards
from dual_emc2.errors import DataError
from dual_emc2.train.config import ConfigError
from dual_emc2.train.schema import PairsConfig

__all__ = ["load_pair_sets", "read_pair_source"]


def read_pair_source(p: PairsConfig, path: str | None, on_bad: str = "raise", *, key: str = "pairs.path"
                     ) -> PairSet:
    """Every pair of the source named by a ``pairs`` config section, read from ``path`` (null: offline default).
    Pairs with empty text, images that do not decode or corrupt shard members stop the read with the culprit named
    (``on_bad="raise"``) or are dropped and counted in ``bad_samples`` (``"skip"``; data.on_bad_sample).  ``key`` is
    the config key that gave ``path`` (``pairs.path`` or ``pairs.eval_path``): missing data names it."""
    if p.source == "shards":
        if path is None:
            raise ConfigError(f"{key} must name the shards for pairs.source=shards")
        return read_shards(path, on_error=on_bad, key=key)  # screens every sample while reading
    if p.source == "wordnet":
        pairs = wordnet_pairs(path or WORDNET_DIR, tuple(p.wordnet_pos), p.wordnet_x)
    elif p.source == "emoji":
        pairs = emoji_pairs(path or EMOJI_DIR)
    elif p.source == "file":
        if path is None:
            raise ConfigError(f"{key} must name the pairs file for pairs.source=file")
        if not Path(path).is_file():
            raise DataNotFound(f"{key}={path}: pairs file not found (a .csv, .tsv or .jsonl file of pairs)")
        pairs = read_pairs_file(path, p.x_key, p.y_key, p.id_key)
    else:
        raise ConfigError(f"pairs.source: unknown {p.source!r}")
    return screen_pairs(pairs, on_bad)


def load_pair_sets(p: PairsConfig, on_bad: str = "raise") -> tuple[PairSet, PairSet | None]:
    """(training pairs, held-out pairs or None) of a ``pairs`` config section: ``eval_path`` gives a separate
    held-out set, else a seeded split of ``eval_size`` pairs (:func:`~dual_emc2.data.pairs.split_pairs`)."""
    full = read_pair_source(p, p.path, on_bad)
    if p.eval_path is not None:
        if p.source in ("wordnet", "emoji"):
            raise ConfigError(f"pairs.eval_path is for shards/file sources; {p.source} uses pairs.eval_size")
        held = read_pair_source(p, p.eval_path, on_bad, key="pairs.eval_path")
        train, _ = split_pairs(full, 0, p.train_size, p.split_seed)
        overlap = np.intersect1d(train.ids, held.ids)
        if overlap.size:
            raise DataError(f"pairs.eval_path {p.eval_path} shares {overlap.size} indices with the training pairs "
                             f"(first: {int(overlap[0])}); indices must identify samples across both sets")
        return train, held
    return split_pairs(full, p.eval_size, p.train_size, p.split_seed)
