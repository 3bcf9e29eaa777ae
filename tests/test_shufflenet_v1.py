"""ShuffleNetV1 (g = 3) and its GA / SGE variants: shapes, layout, size against the published numbers, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ganet.layers import GroupAttention, SpatialGroupEnhance
from ganet.models import create_model, list_models, model_info
from ganet.models.shufflenet_v1 import ShuffleNetV1, ShuffleUnit
from ganet.profile import count_macs

V1_MODELS = [
    "shufflenet_v1", "shufflenet_v1_cifar",
    "ga_shufflenet_v1", "ga_shufflenet_v1_cifar",
    "sge_shufflenet_v1", "sge_shufflenet_v1_cifar",
]
# ImageNet forms run at 64x64 here (stage 4 at 2x2) to keep the file fast; the 224 layout has its own test.
SMALL_SIZE = {224: 64, 32: 32}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_names_and_info() -> None:
    assert list_models("*shufflenet_v1*") == sorted(V1_MODELS)
    expected_rows = {"shufflenet_v1": "ShuffleNetV1", "ga_shufflenet_v1": "GA-ShuffleNetV1",
                     "sge_shufflenet_v1": "SGE-ShuffleNetV1"}
    for name in V1_MODELS:
        info = model_info(name)
        cifar = name.endswith("_cifar")
        assert info.input_size == (32 if cifar else 224), name
        assert info.default_num_classes == (100 if cifar else 1000), name
        assert info.paper_row == expected_rows[name.removesuffix("_cifar")], name


@pytest.mark.parametrize("name", V1_MODELS)
def test_forward_shape_finite_deterministic(name: str) -> None:
    torch.manual_seed(0)
    info = model_info(name)
    model = create_model(name).eval()
    size = SMALL_SIZE[info.input_size]
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        out3 = model(x)
        out3_again = model(x)
        out1 = model(x[:1])
    assert out3.shape == (3, info.default_num_classes)
    assert out1.shape == (1, info.default_num_classes)
    assert torch.isfinite(out3).all() and torch.isfinite(out1).all()
    assert torch.equal(out3, out3_again)
    # eval() mode: a sample's logits do not depend on the rest of the batch
    torch.testing.assert_close(out1[0], out3[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out3[0], out3[1])  # different inputs give different logits


def test_forward_head_pre_logits_and_num_classes() -> None:
    model = create_model("shufflenet_v1_cifar", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 1, 32, 32))
        assert feats.shape == (2, 960, 8, 8)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 960)
        assert model.forward_head(feats).shape == (2, 10)


def _stage_shapes(model: ShuffleNetV1, size: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
        for name in ("maxpool", "stage2", "stage3", "stage4")
    ]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return shapes


def test_cifar_stage_resolutions() -> None:
    model = create_model("shufflenet_v1_cifar")
    shapes = _stage_shapes(model, 32)
    assert shapes["maxpool"] == (1, 24, 32, 32)  # stride-1 stem, no max-pool
    assert shapes["stage2"] == (1, 240, 32, 32)
    assert shapes["stage3"] == (1, 480, 16, 16)
    assert shapes["stage4"] == (1, 960, 8, 8)
    first = model.stage2[0]
    assert isinstance(first.shortcut, nn.Identity) and first.concat  # identity shortcut, still concatenated
    assert first.conv3.out_channels == 240 - 24


def test_imagenet_layout_at_224() -> None:
    model = create_model("shufflenet_v1")
    shapes = _stage_shapes(model, 224)
    assert shapes["maxpool"] == (1, 24, 56, 56)
    assert shapes["stage2"] == (1, 240, 28, 28)
    assert shapes["stage3"] == (1, 480, 14, 14)
    assert shapes["stage4"] == (1, 960, 7, 7)  # 7x7 before the global pool
    for stage in (model.stage2, model.stage3, model.stage4):
        assert isinstance(stage[0].shortcut, nn.AvgPool2d) and stage[0].concat
        assert all(not unit.concat and isinstance(unit.shortcut, nn.Identity) for unit in stage[1:])


def test_group_convs_and_bottleneck_widths() -> None:
    model = create_model("shufflenet_v1")
    units = [u for u in model.modules() if isinstance(u, ShuffleUnit)]
    assert [len(model.stage2), len(model.stage3), len(model.stage4)] == [4, 8, 4]
    assert model.stage2[0].conv1.groups == 1  # the stem's 24 channels are not grouped
    assert all(u.conv1.groups == 3 for u in units[1:])
    assert all(u.conv3.groups == 3 for u in units)
    assert all(u.conv2.groups == u.conv2.in_channels for u in units)  # depthwise
    assert [u.conv2.in_channels for u in units] == [60] * 4 + [120] * 8 + [240] * 4
    assert [model.stage2[0].conv3.out_channels, model.stage3[0].conv3.out_channels,
            model.stage4[0].conv3.out_channels] == [216, 240, 480]


@pytest.mark.parametrize("cifar", [False, True])
def test_ga_blocks_on_every_bottleneck(cifar: bool) -> None:
    model = create_model("ga_shufflenet_v1_cifar" if cifar else "ga_shufflenet_v1")
    blocks = [m for m in model.modules() if isinstance(m, GroupAttention)]
    assert len(blocks) == 16
    assert {b.channels for b in blocks} <= {60, 120, 240}
    assert [b.channels for b in blocks] == [60] * 4 + [120] * 8 + [240] * 4
    assert all(b.groups == 15 for b in blocks)
    units = [u for u in model.modules() if isinstance(u, ShuffleUnit)]
    assert all(isinstance(u.attn, GroupAttention) for u in units)


def test_sge_blocks_and_attn_kwargs() -> None:
    model = create_model("sge_shufflenet_v1_cifar")
    assert sum(isinstance(m, SpatialGroupEnhance) for m in model.modules()) == 16
    model = create_model("ga_shufflenet_v1_cifar", attn_kwargs={"groups": 5})
    assert {m.groups for m in model.modules() if isinstance(m, GroupAttention)} == {5}


def test_attention_sees_the_bottleneck_after_the_depthwise_conv() -> None:
    model = create_model("ga_shufflenet_v1").eval()
    seen: list[tuple[int, ...]] = []
    handle = model.stage3[0].attn.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    handle.remove()
    assert seen == [(1, 120, 4, 4)]  # stage 3 input is 8x8; its first unit's depthwise conv has stride 2


def test_size_matches_published_numbers() -> None:
    model = create_model("shufflenet_v1")
    params = _num_params(model)
    macs = count_macs(model, (1, 3, 224, 224))  # no attention here: convs and the fc only
    print(f"shufflenet_v1: {params} parameters, {macs / 1e6:.1f}M multiply-adds at 224x224")
    # Authors' reference implementation (megvii-model/ShuffleNet-Series): ShuffleNetV1 1.0x (group=3) 1.9M params,
    # 138M FLOPs; the paper's Table 2: 140 MFLOPs.
    assert abs(params - 1.9e6) / 1.9e6 < 0.03, params
    assert abs(macs - 140e6) / 140e6 < 0.03, macs
    # The 3.4M figure belongs to the x1.5 model (same reference: 3.4M params, 292M FLOPs).
    wide = ShuffleNetV1(stages_out_channels=(24, 360, 720, 1440))
    wide_params = _num_params(wide)
    print(f"shufflenet_v1 x1.5: {wide_params} parameters")
    assert abs(wide_params - 3.4e6) / 3.4e6 < 0.03, wide_params


def test_attention_adds_few_parameters() -> None:
    base = _num_params(create_model("shufflenet_v1_cifar"))
    ga = _num_params(create_model("ga_shufflenet_v1_cifar"))
    sge = _num_params(create_model("sge_shufflenet_v1_cifar"))
    assert sge - base == 16 * 2 * 15  # SGE: a weight and a bias per group
    assert ga - base == 17 * (4 * 60 + 8 * 120 + 4 * 240) + 16 * 150  # 17*C + 150 per GA block


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 7}, r"divisible by groups \(7\)"),
        ({"groups": 0}, r"groups must be >= 1, got 0"),
        ({"stages_out_channels": (24, 240, 480)}, r"\[24, 240, 480\]"),
        ({"stages_out_channels": (24, 242, 480, 960)}, r"242"),
        ({"stages_out_channels": (240, 240, 480, 960)}, r"240 -> 240"),
        ({"stages_repeats": (4, 0, 4)}, r"\[4, 0, 4\]"),
        ({"num_classes": 0}, r"num_classes must be >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShuffleNetV1(**kwargs)


def test_bad_attention_groups_raise_value_error() -> None:
    with pytest.raises(ValueError, match=r"60.*7"):
        create_model("ga_shufflenet_v1_cifar", attn_kwargs={"groups": 7})
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        ShuffleUnit(240, 240, stride=3)
