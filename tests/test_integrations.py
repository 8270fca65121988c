"""The library's face: GlobalContrastiveSTLoss against sentence-transformers' own losses, EMC² training through it,
and the examples (sentence-transformers, open_clip under Accelerate, plain-torch SimCLR) end to end at smoke size."""
import copy
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer, models  # noqa: E402

from dual_emc2.integrations.sentence_transformers import GlobalContrastiveSTLoss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ["dog, domestic dog", "cat, house cat", "oak, oak tree", "river", "violin, fiddle", "bread, breadstuff"]
POSITIVES = ["a member of the genus Canis, domesticated by man", "a small domesticated feline kept as a pet",
             "a deciduous tree bearing acorns", "a large natural stream of flowing water",
             "a bowed stringed instrument, the highest member of its family", "food made from dough of flour"]


@pytest.fixture(scope="module")
def minilm():
    try:
        from dual_emc2.towers.text import minilm_path
        path = minilm_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"MiniLM weights unavailable: {err}")
    transformer = models.Transformer(str(path))
    model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_embedding_dimension(), "mean")],
                                device="cpu")
    return model.eval()


def _features(model, ids):
    tok = getattr(model, "preprocess", None) or model.tokenize
    return [tok([ANCHORS[i] for i in ids.tolist()]), tok([POSITIVES[i] for i in ids.tolist()])]


def _references(model, symmetric):
    from sentence_transformers.sentence_transformer import losses
    if not symmetric:
        return [losses.MultipleNegativesRankingLoss(model, scale=20.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MultipleNegativesSymmetricRankingLoss is deprecated in favour of the next
        return [losses.MultipleNegativesSymmetricRankingLoss(model, scale=20.0),
                losses.MultipleNegativesRankingLoss(model, scale=20.0, directions=("query_to_doc", "doc_to_query"),
                                                    partition_mode="per_direction")]


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_equals_multiple_negatives_ranking_loss(minilm, symmetric):
    ids = torch.tensor([0, 1, 2, 3, 4])
    features = _features(minilm, ids)
    param = minilm[0].auto_model.encoder.layer[-1].output.dense.weight
    ours = GlobalContrastiveSTLoss(minilm, num_samples=len(ANCHORS), estimator="infonce", scale=20.0,
                                   symmetric=symmetric)
    value = ours(features, ids)
    (grad,) = torch.autograd.grad(value, [param])
    for ref in _references(minilm, symmetric):
        expected = ref(features, ids)
        (expected_grad,) = torch.autograd.grad(expected, [param])
        assert torch.allclose(value, expected, atol=1e-5), (value, expected)
        assert torch.allclose(grad, expected_grad, atol=1e-5), (grad - expected_grad).abs().max()


def _global_objective(model):
    """Eq. (1), anchors → positives, over all the toy pairs (the positive excluded from the negatives)."""
    with torch.no_grad():
        feats = _features(model, torch.arange(len(ANCHORS)))
        x, y = (torch.nn.functional.normalize(model(f)["sentence_embedding"], dim=-1) for f in feats)
        s = 20.0 * x @ y.t()
        off = s.masked_fill(torch.eye(len(ANCHORS), dtype=torch.bool), float("-inf"))
        return float((-s.diag() + torch.logsumexp(off, dim=1)).mean())


def test_emc2_trains_with_texts_and_keeps_its_chains_in_state_dict(minilm):
    torch.manual_seed(0)
    model = copy.deepcopy(minilm).train()
    loss_fn = GlobalContrastiveSTLoss(model, num_samples=len(ANCHORS), texts=(ANCHORS, POSITIVES))
    chains = loss_fn.estimator.chains.candidate_key
    assert bool((chains == -1).all())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = _global_objective(model)
    reencoded = []
    for ids in ([0, 1, 2, 3], [0, 1, 4, 5], [2, 3, 4, 5], [0, 1, 2, 3], [0, 1, 4, 5], [2, 3, 4, 5]):
        ids = torch.tensor(ids)
        loss = loss_fn(_features(model, ids), ids)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reencoded.append(float(loss_fn.last_stats["reencoded_frac"]))
    after = _global_objective(model)
    assert after < before, (before, after)
    assert max(reencoded) > 0, reencoded  # some chain states lay outside the batch and were re-encoded from texts
    assert bool((chains >= 0).all())  # every anchor's chain has a state
    state = loss_fn.state_dict()
    assert torch.equal(state["loss.estimator.chains.candidate_key"], chains)
    fresh = GlobalContrastiveSTLoss(model, num_samples=len(ANCHORS), texts=(ANCHORS, POSITIVES))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.estimator.chains.candidate_key, chains)


def test_reencoding_without_texts_names_the_fix(minilm):
    with pytest.raises(ValueError, match=r"texts=\(anchors, positives\).*state_score='stale'"):
        GlobalContrastiveSTLoss(minilm, num_samples=len(ANCHORS))
    with pytest.raises(ValueError, match="num_samples=6"):
        GlobalContrastiveSTLoss(minilm, num_samples=len(ANCHORS), texts=(ANCHORS, POSITIVES[:3]))
    loss_fn = GlobalContrastiveSTLoss(minilm, num_samples=len(ANCHORS), weights="visits", proposal="batch",
                                      state_score="stale", out_of_batch="drop")
    ids = torch.tensor([1, 3, 5])
    with torch.no_grad():
        assert torch.isfinite(loss_fn(_features(minilm, ids), ids))
    with pytest.raises(ValueError, match="label"):
        loss_fn(_features(minilm, ids), None)
    assert loss_fn.get_config_dict() == {"num_samples": 6, "estimator": "emc2", "scale": 20.0, "symmetric": False,
                                         "weights": "visits", "proposal": "batch", "state_score": "stale",
                                         "out_of_batch": "drop"}


# ----------------------------------------------------------------------------------------------------------- examples
def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1")


def _run(cmd, expect):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert expect in r.stdout, r.stdout[-2000:]
    return r.stdout


def _needs(path):
    if not Path(path).exists():
        pytest.skip(f"{path} missing (scripts/install.sh)")


@pytest.mark.slow
def test_example_sentence_transformers_wordnet_smoke(minilm):
    _needs("/usr/share/wordnet/data.noun")
    out = _run([sys.executable, "examples/sentence_transformers_wordnet.py", "--smoke"], "held-out recall@1 after")
    assert "step 3/3 loss" in out


@pytest.mark.slow
def test_example_open_clip_emoji_smoke():
    _needs(ROOT / "data_cache" / "emoji")
    out = _run([sys.executable, "examples/open_clip_emoji.py", "--smoke"], "done: image→caption recall@1")
    assert "1 process(es)" in out and "step 3/3 loss" in out


@pytest.mark.slow
def test_example_unimodal_simclr_smoke():
    out = _run([sys.executable, "examples/unimodal_simclr.py", "--smoke"], "done: 3 steps")
    assert "step 3/3 loss" in out


@pytest.mark.dist
@pytest.mark.slow
def test_example_open_clip_emoji_under_accelerate_two_processes():
    _needs(ROOT / "data_cache" / "emoji")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # --multi_gpu without GPUs runs gloo ranks on the CPU; each rank passes its own rows and ids, the loss gathers
    out = _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                "examples/open_clip_emoji.py", "--smoke"], "done: image→caption recall@1")
    assert "2 process(es)" in out and "step 3/3 loss" in out
