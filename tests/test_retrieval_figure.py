"""The retrieval picture (dual_emc2.train.retrieval_figure): exact top-k, seeded queries, PNGs for text–text and
image–text pairs; and the README flow "pairs file → text shards → text_webdataset.yaml → retrieval --png"."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dual_emc2.data.pairs import PairSet
from dual_emc2.train.retrieval_figure import pick_queries, plot_retrieval_examples, top_k

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.determinism
def test_top_k_is_exact_and_best_first():
    q, docs = _unit(3, 8, 0), _unit(20, 8, 1)
    scores, ids = top_k(q, docs, 5)
    full = q @ docs.T
    assert ids.shape == (3, 5) and (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :5])  # exact: top-6 score gaps >= 0.017
    np.testing.assert_allclose(scores, np.take_along_axis(full, ids, 1), rtol=1e-6)
    assert top_k(q, docs[:3], 5)[1].shape == (3, 3)  # k is clamped to the corpus


def test_queries_are_seeded_distinct_and_clamped():
    a = pick_queries(100, 6, seed=3)
    assert (a == pick_queries(100, 6, seed=3)).all() and len(set(a.tolist())) == 6 and (np.diff(a) > 0).all()
    assert len(pick_queries(4, 6)) == 4


def test_text_text_picture(tmp_path: Path):
    n = 12
    pairs = PairSet(np.arange(n) + 100, [f"query {k}" for k in range(n)],
                    [("a rather long document " * 6) + str(k) for k in range(n)], source="toy")
    z = _unit(n, 16, 0)
    out = plot_retrieval_examples(pairs, z, z, tmp_path / "sub" / "r.png", n_queries=4)  # every query right at 1
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 800 and img.height > 200


def test_image_text_picture_both_directions(tmp_path: Path):
    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 4), v, np.uint8), "RGBA").save(buf, format="PNG")
        return buf.getvalue()

    n = 8
    pairs = PairSet(np.arange(n), [png(20 * k) for k in range(n)], [f"caption {k}" for k in range(n)], "image", "text")
    zx, zy = _unit(n, 8, 1), _unit(n, 8, 2)
    for direction in ("x2y", "y2x"):
        out = plot_retrieval_examples(pairs, zx, zy, tmp_path / f"{direction}.png", direction=direction,
                                      queries=[0, 5], k=3, title="toy")
        with Image.open(out) as img:
            assert img.format == "PNG"
    with pytest.raises(ValueError, match="direction"):
        plot_retrieval_examples(pairs, zx, zy, tmp_path / "x.png", direction="x2x")


@pytest.mark.slow
def test_readme_flow_text_pairs_to_streamed_shards_to_training_to_retrieval(tmp_path: Path):
    """README "Two towers": make_shards (train / eval) from a JSONL pairs file → configs/text_webdataset.yaml
    (2 steps) → retrieval of the run folder with a picture; a missing eval shard folder names pairs.eval_path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env=env)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q {k} {k % 7}", "document": f"about {k} and {k % 7}"}) + "\n"
                             for k in range(60)))
    for split in ("train", "eval"):
        r = run("dual-emc2-make-shards", "--out", str(tmp_path / split), "--split", split, "--eval-size", "12",
                "pairs", str(pairs), "--x-key", "query", "--y-key", "document")
        assert r.returncode == 0, r.stderr[-2000:]
    common = ("dual-emc2-train", "--config", "configs/text_webdataset.yaml", f"pairs.path={tmp_path / 'train'}",
              "train.max_steps=2", "train.batch_size=8", "train.plots=false")
    r = run(*common, f"pairs.eval_path={tmp_path / 'eval'}", f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    r = run("dual-emc2-retrieval", "--checkpoint", str(tmp_path / "run"), "--png", str(tmp_path / "r.png"),
            "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "r.png").is_file() and (tmp_path / "run" / "retrieval_eval_ckpt-00000002.json").is_file()
    r = run(*common, f"pairs.eval_path={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run2'}")
    assert r.returncode == 3 and "Traceback" not in r.stderr and "nowhere" in r.stderr
    assert "pairs.eval_path" in r.stderr
    assert not (tmp_path / "run2").exists()
