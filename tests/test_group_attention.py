"""GroupAttention against a direct transcription of the paper's equations, its init, gradients and ablations."""
import pytest
import torch

from ganet.layers.group_attention import graph_mode
from ganet.layers.group_attention_reference import group_attention_reference
from ganet import GroupAttention


def randomize(block: GroupAttention) -> GroupAttention:
    """Move every parameter off its init so that no term can hide behind alpha = 0 or gamma = 1."""
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return block


ABLATIONS = [
    dict(),
    dict(use_u4p=False),
    dict(use_u4u=False),
    dict(normalize=False),
    dict(use_u4u=False, normalize=False),
]


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "full")
@pytest.mark.parametrize("shape", [(2, 60, 8, 8), (3, 30, 5, 7), (1, 120, 4, 4)])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_matches_equations(kwargs, shape, grad):
    block = randomize(GroupAttention(shape[1], groups=15, **kwargs))
    x = torch.randn(shape)
    with torch.set_grad_enabled(grad):
        out = block(x)
        ref = group_attention_reference(block, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "full")
def test_inplace_matches_equations(kwargs):
    block = randomize(GroupAttention(60, inplace=True, **kwargs))
    x = torch.randn(2, 60, 6, 6)
    ref = group_attention_reference(block, x)
    with torch.no_grad():
        out = block(x.clone())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "full")
@pytest.mark.parametrize("shape", [(2, 60, 8, 8), (3, 30, 5, 7)])
def test_graph_mode_matches_equations(kwargs, shape):
    """forward_graph, the export-shaped forward, computes the same function (ablations included)."""
    model = torch.nn.Sequential(randomize(GroupAttention(shape[1], groups=15, inplace=True, **kwargs)))
    x = torch.randn(shape)
    ref = group_attention_reference(model[0], x)
    with graph_mode(model), torch.no_grad():
        assert model[0].graph
        out = model(x)
    assert not model[0].graph  # restored on exit
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_matches_equations_channels_last():
    block = randomize(GroupAttention(60))
    x = torch.randn(2, 60, 6, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, group_attention_reference(block, x.contiguous()), rtol=1e-4, atol=1e-5)


def test_does_not_modify_its_input():
    x = torch.randn(2, 30, 5, 5)
    x_copy = x.clone()
    for ablation in ABLATIONS:
        block = randomize(GroupAttention(30, **ablation))
        for grad in (False, True):  # inference and training forwards
            with torch.set_grad_enabled(grad):
                block(x)
            torch.testing.assert_close(x, x_copy, rtol=0, atol=0, msg=f"{ablation}, grad={grad}")


def test_alpha_zero_gives_the_unary_path_alone():
    full = GroupAttention(60)
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name != "alpha":
                p.add_(torch.randn_like(p) * 0.5)
    assert torch.count_nonzero(full.alpha) == 0  # the paper's init
    unary_only = GroupAttention(60, use_u4p=False)
    unary_only.load_state_dict({k: v for k, v in full.state_dict().items() if k.startswith("u4u")})
    x = torch.randn(2, 60, 7, 7)
    torch.testing.assert_close(full(x), unary_only(x), rtol=0, atol=1e-6)


def test_init_is_the_identity_affine_and_zero_alpha():
    block = GroupAttention(60)
    for name in ("u4u", "pool", "assign"):
        assert torch.equal(getattr(block, f"{name}_gamma"), torch.ones(15))
        assert torch.equal(getattr(block, f"{name}_beta"), torch.zeros(15))
    assert torch.equal(block.alpha, torch.zeros(15))


def test_gradients_reach_alpha_at_init_and_everything_once_alpha_is_nonzero():
    block = GroupAttention(60)
    x = torch.randn(2, 60, 6, 6)
    block(x).square().sum().backward()
    assert block.alpha.grad is not None and block.alpha.grad.abs().sum() > 0

    with torch.no_grad():
        block.alpha.fill_(0.5)
    block.zero_grad()
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        if name.endswith("conv.bias"):
            # normalize() subtracts each map's mean, so a per-map bias has no effect and no gradient (paper-exact).
            assert p.grad is None or p.grad.abs().max() < 1e-4, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_conv_biases_matter_without_normalize():
    block = randomize(GroupAttention(30, normalize=False))
    block.alpha.data.fill_(1.0)
    x = torch.randn(2, 30, 5, 5)
    block(x).sum().backward()
    for name in ("u4u_conv.bias", "pool_conv.bias", "assign_conv.bias"):
        assert block.get_parameter(name).grad.abs().sum() > 0, name


def test_ablation_switches():
    """Table 2: -U4P drops the pairwise path, -U4U the unary scaling, -Normalize the normalize() (and its affine)."""
    x = torch.randn(2, 60, 6, 6)
    no_u4p = GroupAttention(60, use_u4p=False)
    assert not hasattr(no_u4p, "pool_conv") and not hasattr(no_u4p, "alpha")

    no_u4u = randomize(GroupAttention(60, use_u4u=False))
    assert not hasattr(no_u4u, "u4u_conv")
    with torch.no_grad():
        no_u4u.alpha.zero_()
        torch.testing.assert_close(no_u4u(x), x, rtol=0, atol=0)  # nothing scales x without U4U

    no_norm = GroupAttention(60, normalize=False)
    names = {n for n, _ in no_norm.named_parameters()}
    assert not any("gamma" in n or "beta" in n for n in names)
    full = GroupAttention(60)
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in no_norm.parameters()) == 6 * 15


def test_parameter_count_per_block():
    # U4U conv C*G + G, two grouped convs C + G each, three (gamma, beta) pairs, alpha: 17*C + 150 with G = 15.
    for c in (60, 120, 240):
        assert sum(p.numel() for p in GroupAttention(c).parameters()) == 17 * c + 150


def test_pooling_is_a_weighted_mean():
    """Eq. (4), our reading: a constant feature map pools to that constant (no extra 1/(H*W)).

    Without U4U, a constant map's assigning logits are constant, normalize() makes them 0, sigmoid gives 0.5:
    out = x + alpha * y * 0.5 = 2 + 1 * 2 * 0.5 = 3. Dividing by H*W = 16 would give 2.0625.
    """
    block = GroupAttention(30, use_u4u=False)
    with torch.no_grad():
        block.alpha.fill_(1.0)
    out = block(torch.full((1, 30, 4, 4), 2.0))
    torch.testing.assert_close(out, torch.full_like(out, 3.0), rtol=0, atol=0.02)  # eps-level rounding noise


@pytest.mark.parametrize("kwargs,match", [
    (dict(channels=50, groups=15), "divisible"),
    (dict(channels=60, groups=0), "divisible"),
    (dict(channels=60, use_u4u=False, use_u4p=False), "cannot both"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupAttention(**kwargs)
