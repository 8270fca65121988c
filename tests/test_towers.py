import pytest
import torch
from torch import nn

from dual_emc2.towers import ContrastiveEncoder, ProjectionHead, ResNetBackbone, build_image_encoder

torch.set_num_threads(1)


def _layer4_shape(backbone: ResNetBackbone, x: torch.Tensor) -> tuple[int, ...]:
    seen: dict[str, tuple[int, ...]] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["shape"] = tuple(output.shape)

    handle = backbone.layer4.register_forward_hook(hook)
    try:
        out = backbone(x)
    finally:
        handle.remove()
    assert out.shape == (x.shape[0], backbone.out_dim)
    return seen["shape"]


def test_cifar_stem_keeps_4x4_map_on_32px():
    torch.manual_seed(0)
    bb = ResNetBackbone("resnet18", cifar_stem=True).eval()
    assert bb.out_dim == 512
    assert bb.conv1.kernel_size == (3, 3) and bb.conv1.stride == (1, 1)
    assert isinstance(bb.maxpool, nn.Identity)
    assert _layer4_shape(bb, torch.randn(2, 3, 32, 32)) == (2, 512, 4, 4)
    assert bb.feature_map(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)


def test_standard_stem_on_96px_and_grey_input():
    torch.manual_seed(0)
    bb = ResNetBackbone("resnet18").eval()
    assert bb.conv1.kernel_size == (7, 7) and bb.conv1.stride == (2, 2)
    assert _layer4_shape(bb, torch.randn(2, 3, 96, 96)) == (2, 512, 3, 3)
    grey = ResNetBackbone("resnet18", cifar_stem=True, in_channels=1).eval()
    assert _layer4_shape(grey, torch.randn(2, 1, 28, 28)) == (2, 512, 4, 4)
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        grey(torch.randn(2, 3, 28, 28))


def test_resnet50_out_dim_and_torchvision_state_dict_names():
    import torchvision

    bb = ResNetBackbone("resnet50")
    assert bb.out_dim == 2048
    tv = torchvision.models.resnet50(weights=None).state_dict()
    ours = bb.state_dict()
    assert set(ours) == {k for k in tv if not k.startswith("fc.")}
    # the pooled features equal torchvision's forward with its fc removed, given the same weights
    small = ResNetBackbone("resnet18").eval()
    ref = torchvision.models.resnet18(weights=None).eval()
    ref.fc = nn.Identity()
    ref.load_state_dict(small.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x))


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="resnet18.*resnet34.*resnet50"):
        ResNetBackbone("vgg16")


def test_projection_head_layers():
    head = ProjectionHead(512, 256, 128, num_layers=3)
    kinds = [type(m) for m in head.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head.net[0].bias is None and head.net[-1].bias is not None
    assert head(torch.randn(4, 512)).shape == (4, 128)
    no_bn = ProjectionHead(8, 16, 4, batch_norm=False)
    assert [type(m) for m in no_bn.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert isinstance(ProjectionHead(8, 16, 4, num_layers=1).net[0], nn.Linear)
    x = torch.randn(3, 8)
    assert torch.equal(ProjectionHead(8, 0, 8, num_layers=0)(x), x)
    with pytest.raises(ValueError, match="out_dim == in_dim"):
        ProjectionHead(8, 16, 4, num_layers=0)
    with pytest.raises(ValueError, match="hidden_dim"):
        ProjectionHead(8, 0, 4, num_layers=2)


def test_encoder_outputs_unit_norm_projection_and_backbone_features():
    torch.manual_seed(0)
    enc = build_image_encoder("resnet18", cifar_stem=True, proj_hidden=64, proj_dim=32)
    assert isinstance(enc, ContrastiveEncoder)
    x = torch.randn(4, 3, 32, 32)
    enc.eval()
    with torch.no_grad():
        z = enc(x)
        h, z2 = enc.encode(x)
        h_only = enc.features(x)
    assert z.shape == (4, 32) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    assert h.shape == (4, 512)
    torch.testing.assert_close(h, h_only)
    torch.testing.assert_close(z2, z)
    # z is the normalised projection of h, not of anything else
    with torch.no_grad():
        p = enc.head(h)
    torch.testing.assert_close(z, p / p.norm(dim=1, keepdim=True))


def test_encoder_fp32_unit_norm_under_bf16_autocast():
    torch.manual_seed(0)
    enc = build_image_encoder("resnet18", cifar_stem=True, proj_hidden=64, proj_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h, z = enc.encode(x)
        p = enc.head(h)
    assert p.dtype == torch.bfloat16  # autocast really ran the tower in bf16
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2), atol=1e-6, rtol=0)


def test_channels_last_matches_default_layout():
    torch.manual_seed(0)
    enc = build_image_encoder("resnet18", cifar_stem=True, proj_hidden=32, proj_dim=8).eval()
    enc_cl = build_image_encoder("resnet18", cifar_stem=True, proj_hidden=32, proj_dim=8, channels_last=True).eval()
    enc_cl.load_state_dict(enc.state_dict())
    assert enc_cl.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc_cl(x), enc(x), atol=1e-5, rtol=1e-4)
