"""The small CNN backbone (``model.arch: small_cnn``): shapes, the features the evaluation reads, the config choice,
and the did-you-mean of an unknown backbone."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dual_emc2.towers.heads import IMAGE_ARCHS, SmallCNNBackbone, build_image_encoder, check_arch
from dual_emc2.train.config import ConfigError, load_config
from dual_emc2.train.models import build_unimodal_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size, side", [(28, 4), (32, 4), (8, 1)])
def test_backbone_shapes(size: int, side: int) -> None:
    net = SmallCNNBackbone()
    x = torch.randn(3, 3, size, size)
    assert net.out_dim == 128
    assert net.feature_map(x).shape == (3, 128, side, side)
    assert net(x).shape == (3, 128)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and [c.stride for c in convs] == [(2, 2)] * 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3
    with pytest.raises(ValueError, match=r"expected images \[N, 3, H, W\]"):
        net(torch.randn(3, 1, size, size))


def test_group_norm_width_and_channels() -> None:
    net = SmallCNNBackbone(in_channels=1, width=8, norm="group")
    assert net.out_dim == 32 and sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 32)
    with pytest.raises(ValueError, match="model.norm"):
        SmallCNNBackbone(norm="layer")


def test_encoder_features_feed_the_projection_head() -> None:
    enc = build_image_encoder("small_cnn", cifar_stem=True, proj_hidden=64, proj_dim=16)
    assert isinstance(enc.backbone, SmallCNNBackbone) and enc.head.in_dim == 128
    x = torch.randn(5, 3, 28, 28)
    enc.eval()
    with torch.no_grad():
        h, z = enc.encode(x)
        assert h.shape == (5, 128) and z.shape == (5, 16)
        torch.testing.assert_close(enc.features(x), h)  # what linear probe / k-NN read: the backbone, pre-head
        torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    z = enc.train()(x)
    z.sum().backward()
    assert all(p.grad is not None for p in enc.backbone.parameters())


def test_config_accepts_small_cnn_and_rejects_unknown_arch() -> None:
    for arch in IMAGE_ARCHS:  # every backbone the encoder builds is a valid model.arch
        assert load_config(None, [f"model.arch={arch}"]).model.arch == arch
    cfg = load_config(ROOT / "configs/fmnist_small_cnn.yaml")
    assert cfg.model.arch == "small_cnn" and cfg.data.subset == 10000 and cfg.train.epochs == 20
    model = build_unimodal_model(cfg)
    assert isinstance(model.encoder.backbone, SmallCNNBackbone)
    assert load_config(None, ["model.arch=small_cnn"]).model.arch == "small_cnn"
    with pytest.raises(ConfigError, match=r"model\.arch: expected one of .*'small_cnn', got 'smal_cnn' "
                                          r"\(did you mean 'small_cnn'\?\)"):
        load_config(None, ["model.arch=smal_cnn"])
    with pytest.raises(ValueError, match=r"unknown backbone 'smal_cnn' \(did you mean 'small_cnn'\?\)"):
        build_image_encoder("smal_cnn", False, 64, 16)
    with pytest.raises(ValueError, match=r"did you mean 'resnet18'"):
        check_arch("resnet_18")
    with pytest.raises(ValueError) as e:
        check_arch("vgg16")
    assert "did you mean" not in str(e.value) and "small_cnn" in str(e.value)


def test_trainer_fits_and_evaluates_small_cnn(tmp_path: Path) -> None:
    from dual_emc2.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs/fmnist_small_cnn.yaml", [
        "data.name=digits", "data.image_size=8", "data.subset=64", "model.proj_hidden=32", "model.proj_dim=16",
        "train.batch_size=16", "train.epochs=1", "train.ckpt_every=1000", "eval.max_train=200", "eval.max_test=100",
        "eval.probe_epochs=5", "eval.batch_size=128", "eval.geometry=false", f"output_dir={tmp_path}"])
    final = Trainer(cfg).fit()
    assert final["step"] == 4
    assert 0.0 <= final["linear_probe_acc"] <= 1.0 and 0.0 <= final["knn1_acc"] <= 1.0
