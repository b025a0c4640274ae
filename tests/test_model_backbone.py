"""Visual backbones: shapes, local-weights loading, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from avseg.errors import CheckpointError, ConfigError
from avseg.models.backbone import ResNetBackbone, SwinTBackbone, TimmBackbone


def _shapes(maps):
    return [tuple(m.shape) for m in maps]


def test_resnet18_strides_and_channels():
    net = ResNetBackbone(name="resnet18", random_init=True, frozen_bn=False)
    maps = net(torch.randn(2, 3, 64, 96))
    assert _shapes(maps) == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    assert net.out_channels == [64, 128, 256, 512]


def test_resnet50_frozen_bn_and_trainable_stages():
    net = ResNetBackbone(name="resnet50", random_init=True, frozen_bn=True, trainable_stages=(3, 4))
    assert net.out_channels == [256, 512, 1024, 2048]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    assert not net.body.conv1.weight.requires_grad and not net.body.layer2[0].conv1.weight.requires_grad
    assert net.body.layer3[0].conv1.weight.requires_grad


def test_resnet_channels_last_gives_the_same_maps_and_keeps_format_on_load(tmp_path):
    """NHWC weights and input (the default) compute the NCHW network's maps to float32 rounding;
    loading a state dict (as Lightning and init_from do) keeps the format."""
    torch.manual_seed(0)
    nchw = ResNetBackbone(name="resnet18", random_init=True, frozen_bn=True, channels_last=False).eval()
    path = tmp_path / "backbone.pth"
    torch.save(nchw.state_dict(), path)
    nhwc = ResNetBackbone(name="resnet18", random_init=True, frozen_bn=True).eval()
    nhwc.load_state_dict(torch.load(path, weights_only=True))
    assert nhwc.body.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.body.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(nhwc(x), nchw(x)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_swin_t_nchw_outputs():
    net = SwinTBackbone(random_init=True)
    maps = net(torch.randn(1, 3, 64, 64))
    assert _shapes(maps) == [(1, 96, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4), (1, 768, 2, 2)]


def test_timm_features_only_resnet18():
    net = TimmBackbone(name="resnet18", random_init=True)
    maps = net(torch.randn(1, 3, 64, 64))
    assert _shapes(maps) == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]


def test_torchvision_state_dict_loads_with_fc_dropped(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # includes fc.weight / fc.bias
    net = ResNetBackbone(name="resnet18", weights=str(path), frozen_bn=True)
    assert torch.equal(net.body.layer2[1].conv2.weight, reference.layer2[1].conv2.weight)
    assert torch.equal(net.body.bn1.running_var, reference.bn1.running_var)
    assert not hasattr(net.body, "fc")


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer9.conv.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"bad\.pth.*layer9\.conv\.weight"):
        ResNetBackbone(name="resnet18", weights=str(path))


def test_missing_key_is_an_error(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "short.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: layer1\.0\.conv1\.weight"):
        ResNetBackbone(name="resnet18", weights=str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ResNetBackbone(name="resnet18", weights=str(tmp_path / "absent.pth"))


def test_no_weights_without_random_init_is_an_error():
    with pytest.raises(ConfigError, match="random_init"):
        ResNetBackbone(name="resnet18", weights=None, random_init=False)


def test_timm_weights_load_with_classifier_dropped(tmp_path):
    import timm

    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "timm_resnet18.pth"
    torch.save(reference.state_dict(), path)
    net = TimmBackbone(name="resnet18", weights=str(path))
    assert torch.equal(net.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    state = reference.state_dict()
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="extra.weight"):
        TimmBackbone(name="resnet18", weights=str(path))
