"""The comparison attentions (SE, CBAM, SGE, NL, GNL) and the in-place contract every attention block shares."""
import pytest
import torch
import torch.nn.functional as F

from ganet.layers import ATTN_LAYERS, CBAM, GroupNonLocal, NonLocal, SpatialGroupEnhance, SqueezeExcite, get_attn


def perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module.eval()


@pytest.mark.parametrize("name", sorted(ATTN_LAYERS))
def test_inplace_flag_only_changes_memory_not_values(name):
    torch.manual_seed(1)
    block = perturbed(get_attn(name)(60))
    x = torch.randn(2, 60, 6, 6)
    expected = block(x.clone())
    block.inplace = True
    with torch.no_grad():
        x_in = x.clone()
        out = block(x_in)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(x_in, out) or x_in.data_ptr() == out.data_ptr()  # the input's memory now holds the output

    x_train = x.clone().requires_grad_()
    out = block(x_train * 1.0)  # autograd on: never in place, so backward works
    out.sum().backward()
    assert x_train.grad is not None
    torch.testing.assert_close(x_train.detach(), x)


@pytest.mark.parametrize("name", sorted(ATTN_LAYERS))
def test_default_leaves_input_untouched(name):
    block = perturbed(get_attn(name)(60))
    x = torch.randn(2, 60, 5, 5)
    before = x.clone()
    with torch.no_grad():
        block(x)
    assert torch.equal(x, before)


def test_unknown_attention_lists_valid_names():
    with pytest.raises(ValueError, match="unknown attention 'eca'.*ga.*sge"):
        get_attn("eca")


def test_squeeze_excite_matches_its_definition():
    se = perturbed(SqueezeExcite(60, reduction=4))
    x = torch.randn(2, 60, 5, 5)
    s = x.mean(dim=(2, 3))
    gate = torch.sigmoid(F.linear(F.relu(F.linear(s, se.fc1.weight[:, :, 0, 0], se.fc1.bias)),
                                  se.fc2.weight[:, :, 0, 0], se.fc2.bias))
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])
    assert se.fc1.out_channels == 15


def test_cbam_matches_its_definition():
    cbam = perturbed(CBAM(60))
    x = torch.randn(2, 60, 7, 7)
    mlp = cbam.mlp
    channel = torch.sigmoid(mlp(x.mean(dim=(2, 3), keepdim=True)) + mlp(x.amax(dim=(2, 3), keepdim=True)))
    x1 = x * channel
    spatial = torch.sigmoid(cbam.spatial(torch.cat([x1.mean(1, keepdim=True), x1.amax(1, keepdim=True)], 1)))
    torch.testing.assert_close(cbam(x), x1 * spatial)


def test_sge_matches_its_definition_and_init():
    sge = SpatialGroupEnhance(60, groups=15)
    assert torch.equal(sge.weight, torch.zeros(15)) and torch.equal(sge.bias, torch.ones(15))
    x = torch.randn(2, 60, 6, 6)
    torch.testing.assert_close(sge(x), x * torch.sigmoid(torch.tensor(1.0)))  # at init the gate is sigmoid(1)
    perturbed(sge)
    xg = x.view(2 * 15, 4, 6, 6)
    t = (xg * xg.mean(dim=(2, 3), keepdim=True)).sum(1, keepdim=True)
    t = (t - t.mean(dim=(2, 3), keepdim=True)) / (t.std(dim=(2, 3), keepdim=True) + 1e-5)
    t = t.view(2, 15, 6, 6) * sge.weight.view(1, 15, 1, 1) + sge.bias.view(1, 15, 1, 1)
    expected = (xg.view(2, 15, 4, 6, 6) * torch.sigmoid(t).unsqueeze(2)).view(2, 60, 6, 6)
    torch.testing.assert_close(sge(x), expected)


def nonlocal_reference(block: NonLocal, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    g, d = block.groups, block.inner // block.groups
    theta = block.theta(x).view(b, g, d, h * w)
    phi = block.phi(x).view(b, g, d, h * w)
    val = block.g(x).view(b, g, d, h * w)
    affinity = torch.softmax(theta.transpose(2, 3) @ phi, dim=-1)  # (B, G, N, N), embedded Gaussian
    y = (affinity @ val.transpose(2, 3)).transpose(2, 3).reshape(b, block.inner, h, w)
    return x + block.bn(block.out(y))


@pytest.mark.parametrize("cls,groups", [(NonLocal, 1), (GroupNonLocal, 15)])
def test_non_local_matches_its_definition(cls, groups):
    block = perturbed(cls(60))
    assert block.groups == groups and block.inner == 30
    x = torch.randn(2, 60, 5, 6)
    torch.testing.assert_close(block(x), nonlocal_reference(block, x), rtol=1e-4, atol=1e-5)


def test_non_local_starts_as_identity():
    block = NonLocal(60).eval()
    x = torch.randn(2, 60, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_group_non_local_has_nl_parameters():
    assert sum(p.numel() for p in NonLocal(60).parameters()) == sum(p.numel() for p in GroupNonLocal(60).parameters())


@pytest.mark.parametrize("cls,kwargs,match", [
    (SqueezeExcite, dict(channels=3, reduction=4), "reduction"),
    (CBAM, dict(channels=60, kernel_size=4), "odd"),
    (SpatialGroupEnhance, dict(channels=50, groups=15), "divisible"),
    (GroupNonLocal, dict(channels=40, groups=15), "divisible"),
])
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
