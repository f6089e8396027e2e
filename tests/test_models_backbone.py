"""The ResNet uses torchvision parameter names and shapes and loads torchvision-format files."""
from __future__ import annotations

import pytest
import torch

from models.backbone import ResNet
from models.config import BackboneConfig
from models.fpn import FPN

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# torchvision resnet18().state_dict() without fc.weight / fc.bias, written out module by module
RESNET18_CONVS = [
    "conv1",
    "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
    "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2",
    "layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv1", "layer3.1.conv2",
    "layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2",
]
RESNET18_BNS = [
    "bn1",
    "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2",
    "layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn1", "layer2.1.bn2",
    "layer3.0.bn1", "layer3.0.bn2", "layer3.0.downsample.1", "layer3.1.bn1", "layer3.1.bn2",
    "layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn1", "layer4.1.bn2",
]
RESNET18_KEYS = {f"{c}.weight" for c in RESNET18_CONVS} | {f"{b}.{s}" for b in RESNET18_BNS for s in BN_SUFFIXES}

# shapes of torchvision keys (resnet18, resnet50, wide_resnet101_2) and parameter counts without fc
KNOWN_SHAPES = {
    18: {"conv1.weight": (64, 3, 7, 7), "layer2.0.conv1.weight": (128, 64, 3, 3),
         "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.1.conv2.weight": (512, 512, 3, 3)},
    50: {"layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
         "layer3.0.conv2.weight": (256, 256, 3, 3), "layer3.5.bn3.running_var": (1024,),
         "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer4.0.downsample.1.weight": (2048,)},
}
KNOWN_COUNTS = {18: (120, 11_176_512), 50: (318, 23_508_032)}  # torchvision: 122 keys / 11,689,512 with fc


def _param_count(state):
    return sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_resnet18_keys_match_torchvision_exactly():
    state = ResNet(BackboneConfig(depth=18)).state_dict()
    assert set(state) == RESNET18_KEYS


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_shapes_and_counts_match_torchvision(depth):
    state = ResNet(BackboneConfig(depth=depth)).state_dict()
    for key, shape in KNOWN_SHAPES[depth].items():
        assert tuple(state[key].shape) == shape, key
    assert (len(state), _param_count(state)) == KNOWN_COUNTS[depth]
    if depth == 50:
        blocks = {k.split(".")[0]: int(k.split(".")[1]) + 1 for k in state if k.startswith("layer")}
        assert blocks == {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}


def test_wide_resnet101_2_parameter_count_matches_torchvision():
    # torchvision wide_resnet101_2: 126,886,696 parameters including the 2048x1000 fc
    model = ResNet(BackboneConfig(depth=101, width_per_group=128))
    assert sum(p.numel() for p in model.parameters()) == 126_886_696 - 2048 * 1000 - 1000
    assert tuple(model.layer2[0].conv2.weight.shape) == (256, 256, 3, 3)  # width 128 * 2


def test_loads_a_torchvision_format_file_ignoring_fc(tmp_path):
    torch.manual_seed(0)
    source = ResNet(BackboneConfig(depth=18, base_channels=16))  # narrow: same key names, smaller file
    for p in source.parameters():
        p.data.normal_()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    loaded = ResNet(BackboneConfig(depth=18, base_channels=16, pretrained=str(path)))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    # DataParallel-style "module." prefixes and a wrapping dict are accepted too
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    wrapped = ResNet(BackboneConfig(depth=18, base_channels=16, pretrained=str(path)))
    torch.testing.assert_close(wrapped.conv1.weight, source.conv1.weight)


def test_mismatched_or_missing_pretrained_file_is_named(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(ResNet(BackboneConfig(depth=18, base_channels=16)).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not match.*layer1\.0\.conv3\.weight"):
        ResNet(BackboneConfig(depth=50, base_channels=16, pretrained=str(path)))
    with pytest.raises(ValueError, match=r"shape mismatches \['conv1\.weight"):
        ResNet(BackboneConfig(depth=18, base_channels=8, pretrained=str(path)))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        ResNet(BackboneConfig(depth=18, pretrained=str(tmp_path / "nope.pth")))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        ResNet(BackboneConfig(depth=18, pretrained=str(tmp_path / "bad.pth")))


def test_frozen_stages_have_no_gradients_and_fixed_batchnorm():
    model = ResNet(BackboneConfig(depth=18, base_channels=8, frozen_stages=1)).train()
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert model.layer2[0].conv1.weight.requires_grad
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.layer2[0].bn1.training


def test_feature_strides_and_fpn_levels():
    backbone = ResNet(BackboneConfig(depth=18, base_channels=8))
    feats = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 32, 4, 6), (1, 64, 2, 3)]
    outs = FPN(backbone.out_channels, 16, num_levels=4)(feats)
    assert [tuple(o.shape) for o in outs] == [(1, 16, 16, 24), (1, 16, 8, 12), (1, 16, 4, 6), (1, 16, 2, 3)]
    three = FPN(backbone.out_channels, 16, num_levels=3)
    assert three.strides == [8, 16, 32] and len(three(feats)) == 3


def test_norm_eval_keeps_batchnorm_statistics_fixed_in_training_mode():
    net = ResNet(BackboneConfig(depth=18, base_channels=8, norm_eval=True)).train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bns[0].running_mean)
    assert ResNet(BackboneConfig(depth=18, base_channels=8)).train().bn1.training  # default: BN trains
