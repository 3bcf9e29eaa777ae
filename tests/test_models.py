"""Every registered model, the registry, torchvision parity, and the Table 1 profile."""
import pytest
import torch
import torchvision

import ganet
from ganet.layers import GroupAttention, NonLocal
from ganet.models import register_model
from ganet.profile import CHECKED_ROWS, MACS_TOLERANCE, PARAM_TOLERANCE, TABLE1, profile_model


@pytest.mark.parametrize("name", ganet.list_models())
def test_forward_shapes_and_determinism(name):
    info = ganet.model_info(name)
    model = ganet.create_model(name, num_classes=7).eval()
    s = info.input_size
    for batch in (1, 3):
        x = torch.randn(batch, 3, s, s)
        with torch.no_grad():
            out = model(x)
            again = model(x)
        assert out.shape == (batch, 7)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, again, rtol=0, atol=0)
    # batch composition must not change a sample's answer in eval mode
    x = torch.randn(3, 3, s, s)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ga_shufflenet_v2_cifar", "shufflenet_v2"])
def test_trains_one_step(name):
    model = ganet.create_model(name, num_classes=5).train()
    s = ganet.model_info(name).input_size
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, s, s)), torch.tensor([0, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.endswith("conv.bias"))


def test_torchvision_parity():
    """Same parameter names and layout as torchvision's shufflenet_v2_x1_0: strict load, same outputs."""
    reference = torchvision.models.shufflenet_v2_x1_0().eval()
    with torch.no_grad():  # move BN statistics off their init so that they are really compared
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    ours = ganet.create_model("shufflenet_v2").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)
    assert list(ours.state_dict()) == list(reference.state_dict())


def test_cifar_layout():
    """3x3 stride-1 stem, no max-pool, no downsampling in stage 2: stages at 32, 16 and 8 pixels."""
    model = ganet.create_model("ga_shufflenet_v2_cifar").eval()
    sizes = {}
    for stage in ("stage2", "stage3", "stage4"):
        getattr(model, stage).register_forward_hook(lambda m, i, o, s=stage: sizes.__setitem__(s, o.shape[-1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert sizes == {"stage2": 32, "stage3": 16, "stage4": 8}
    assert model.conv1[0].stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)


def test_attention_placement():
    ga = ganet.create_model("ga_shufflenet_v2")
    blocks = [m for m in ga.modules() if isinstance(m, GroupAttention)]
    assert [b.channels for b in blocks] == [60] * 4 + [120] * 8 + [240] * 4 and all(b.groups == 15 for b in blocks)
    nl = ganet.create_model("gnl_shufflenet_v2_cifar")
    placed = [n for n, m in nl.named_modules() if isinstance(m, NonLocal)]
    assert placed == ["stage2.3.attn"] and nl.stage2[3].attn.groups == 15


def test_attn_kwargs_reach_the_blocks():
    model = ganet.create_model("ga_shufflenet_v2_cifar", attn_kwargs={"use_u4p": False})
    blocks = [m for m in model.modules() if isinstance(m, GroupAttention)]
    assert len(blocks) == 16 and all(not b.use_u4p and b.inplace for b in blocks)  # inplace: the backbone default


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'ga_resnet'.*ga_shufflenet_v2_cifar"):
        ganet.create_model("ga_resnet")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        @register_model(input_size=32, paper_row="x")
        def ga_shufflenet_v2_cifar(num_classes: int = 10):  # noqa: F811
            raise AssertionError


def test_list_models_filter():
    assert ganet.list_models("ga_*") == sorted(n for n in ganet.list_models() if n.startswith("ga_"))
    assert "ga_shufflenet_v2" in ganet.list_models("ga_*")


@pytest.mark.parametrize("row", CHECKED_ROWS)
@pytest.mark.parametrize("dataset", ["cifar", "imagenet"])
def test_profile_matches_table1(row, dataset):
    name = next(n for n in ganet.list_models("*shufflenet_v2*")
                if ganet.model_info(n).paper_row == row and ganet.model_info(n).dataset == dataset)
    result = profile_model(name)
    paper_params, paper_macs, _ = TABLE1[row][dataset]
    assert abs(result.params / 1e6 / paper_params - 1) <= PARAM_TOLERANCE, result
    assert abs(result.macs / 1e6 / paper_macs - 1) <= MACS_TOLERANCE, result


def test_exact_parameter_counts():
    """The counts the widths 120/240/480 were chosen for (Table 1: 1.43M and 2.39M)."""
    assert profile_model("shufflenet_v2_cifar").params == 1_425_508
    assert profile_model("ga_shufflenet_v2").params == 2_387_128
    assert profile_model("shufflenet_v2").params == 2_278_604  # torchvision's x1.0


def test_profile_cli(capsys):
    from ganet.profile import main

    assert main(["--models", "ga_shufflenet_v2*"]) == 0
    out = capsys.readouterr().out
    assert "ga_shufflenet_v2_cifar" in out and "2,387,128" in out and "194.14" in out
    assert main(["--models", "nope*"]) == 2
    assert "no registered model matches" in capsys.readouterr().err


def test_builder_without_num_classes_is_refused():
    with pytest.raises(ValueError, match="must take num_classes"):
        @register_model(input_size=32, paper_row="x")
        def no_classes_model(width: int = 3):
            raise AssertionError
    assert "no_classes_model" not in ganet.list_models()


@pytest.mark.parametrize("name", ["ga_shufflenet_v2_cifar", "shufflenet_v2"])
def test_channels_last_runs_channels_last_through_every_unit(name):
    """A channels_last input stays channels_last in every unit (split and downsampling alike), with the same output
    as NCHW: a unit that fell back to NCHW would make every following convolution convert its input."""
    from ganet.models.shufflenet_v2 import InvertedResidual

    torch.manual_seed(0)
    model = ganet.create_model(name, num_classes=10).eval()
    size = 32 if name.endswith("_cifar") else 64
    x = torch.randn(2, 3, size, size)
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
             for m in model.modules() if isinstance(m, InvertedResidual)]
    with torch.no_grad():
        expected = model(x)
        layouts.clear()
        got = model(x.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    assert layouts and all(layouts), layouts
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
