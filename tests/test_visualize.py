"""ganet-visualize and the blocks' mask hooks: the maps a hook receives are the ones the forward pass computes (the
equations, checked against the direct transcription), hooking changes no output, and the drawings have the
documented grid, are not blank and keep eq. (3)'s normalisation, on the default digits checkpoint and an NL model."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import ganet
from ganet import visualize
from ganet.layers import GroupAttention, GroupNonLocal, NonLocal
from ganet.layers.group_attention_reference import group_attention_reference, reference_masks

import real_images


def randomized(block: torch.nn.Module) -> torch.nn.Module:
    """Parameters away from their init (alpha, gamma, beta nonzero), so every term of the equations matters."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    return block.eval()


def record(block: torch.nn.Module) -> tuple[dict, object]:
    seen: dict[str, torch.Tensor] = {}
    handle = block.register_mask_hook(lambda _b, maps: seen.update({k: v.clone() for k, v in maps.items()}))
    return seen, handle


@pytest.mark.parametrize("ablation", [{}, {"use_u4u": False}, {"use_u4p": False}, {"normalize": False}])
@pytest.mark.parametrize("grad", [False, True])
def test_ga_hook_hands_over_the_masks_of_the_equations(ablation, grad):
    block = randomized(GroupAttention(60, groups=15, inplace=True, **ablation))
    x = torch.randn(2, 60, 6, 7)
    expected_masks = reference_masks(block, x)
    expected_out = group_attention_reference(block, x)
    with torch.set_grad_enabled(grad):
        plain = block(x.clone())
        seen, handle = record(block)
        hooked = block(x.clone())  # (inplace: the block may overwrite its input in inference)
    assert set(seen) == set(expected_masks) and seen
    for name, mask in expected_masks.items():
        assert seen[name].shape == (2, 15, 6, 7)
        torch.testing.assert_close(seen[name], mask, atol=1e-5, rtol=1e-4)
    if "pool" in seen:  # eq. (3): a softmax over H x W
        torch.testing.assert_close(seen["pool"].sum(dim=(2, 3)), torch.ones(2, 15))
    assert torch.equal(plain, hooked)
    torch.testing.assert_close(hooked, expected_out, atol=1e-4, rtol=1e-4)
    handle.remove()
    seen.clear()
    block(x.clone())
    assert not seen


@pytest.mark.parametrize("cls", [NonLocal, GroupNonLocal])
def test_nonlocal_hook_gives_the_pixel_pair_attention_and_changes_no_output(cls):
    block = randomized(cls(60))
    x = torch.randn(2, 60, 5, 6)
    with torch.no_grad():
        plain = block(x)
        seen, handle = record(block)
        hooked = block(x)
        handle.remove()
        heads, d = block.groups, block.inner // block.groups
        q = block.theta(x).view(2, heads, d, 30)  # the embedded-Gaussian affinity, query pixel first
        k = block.phi(x).view(2, heads, d, 30)
        expected = torch.softmax(torch.einsum("bhdq,bhdk->bhqk", q, k), dim=-1).view(2, heads, 5, 6, 5, 6)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["attention"], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(seen["attention"].sum(dim=(4, 5)), torch.ones(2, heads, 5, 6))


def png_array(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def expected_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a drawing with this grid, as the module documents it."""
    return (round((visualize.LABEL_IN + cols * visualize.PANEL_IN) * visualize.DPI),
            round((visualize.TITLE_IN + rows * visualize.PANEL_IN) * visualize.DPI))


def panels(drawing: visualize.Drawing, pixels: np.ndarray) -> list[np.ndarray]:
    """Each panel's pixels, cut from the PNG by its axes' box (row-major, as the grid is drawn)."""
    height = pixels.shape[0]
    out = []
    for ax in drawing.figure.axes:
        x0, y0, x1, y1 = (round(v) for v in ax.get_window_extent().extents)
        out.append(pixels[height - y1 + 2:height - y0 - 2, x0 + 2:x1 - 2])  # inside the frame
    return out


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "flower.jpg"
    real_images.photos("flower")["flower"].save(path, quality=90)
    return path


def test_nonlocal_model_drawing(tmp_path, flower):
    """A small NL model (CIFAR form, untrained: the maps come from the real pass whatever the weights)."""
    torch.manual_seed(0)
    checkpoint = ganet.save_checkpoint(tmp_path / "nl.safetensors",
                                       ganet.create_model("nl_shufflenet_v2_cifar", num_classes=10),
                                       "nl_shufflenet_v2_cifar")
    drawing = visualize.visualize(checkpoint, flower, queries=[(3, 4), (30, 20)])
    out = tmp_path / "nl.png"
    out.write_bytes(drawing.png())
    assert (drawing.rows, drawing.cols) == (1, 3) and len(drawing.figure.axes) == 3
    assert Image.open(out).size == expected_size(1, 3)
    attention = drawing.blocks[0].maps["attention"]  # (1 head, 32, 32, 32, 32): stage 2 of the CIFAR form
    assert drawing.blocks[0].name == "stage2.3.attn" and attention.shape == (1, 32, 32, 32, 32)
    np.testing.assert_allclose(attention.sum(axis=(3, 4)), 1.0, atol=1e-4)  # every query's map is a softmax
    for panel in panels(drawing, png_array(out)):  # not blank: the image and both maps vary across the panel
        assert panel.size and panel.reshape(-1, 3).std(axis=0).max() > 5
    assert not np.array_equal(attention[0, 4, 3], attention[0, 20, 30])  # two queries, two maps


def test_nonlocal_default_queries_and_bad_requests(tmp_path, flower, capsys):
    checkpoint = ganet.save_checkpoint(tmp_path / "nl.safetensors", ganet.create_model("nl_shufflenet_v2_cifar"),
                                       "nl_shufflenet_v2_cifar")
    assert visualize.default_queries(32) == [(16, 16), (8, 8), (24, 24)]
    assert visualize.main([str(checkpoint), str(flower), "-o", str(tmp_path / "d.png")]) == 0
    assert Image.open(tmp_path / "d.png").size == expected_size(1, 4)
    capsys.readouterr()
    assert visualize.main([str(checkpoint), str(flower), "-o", str(tmp_path / "x.png"), "--query", "32,0"]) == 2
    assert "--query 32,0 is outside the 32x32 network input" in capsys.readouterr().err
    se = ganet.save_checkpoint(tmp_path / "se.safetensors", ganet.create_model("se_shufflenet_v2_cifar"),
                               "se_shufflenet_v2_cifar")
    assert visualize.main([str(se), str(flower), "-o", str(tmp_path / "x.png")]) == 2
    assert "has no Group Attention or non-local block" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert visualize.main([str(checkpoint), str(text), "-o", str(tmp_path / "x.png")]) == 2
    assert "notes.txt: not an image" in capsys.readouterr().err
    assert visualize.main([str(tmp_path / "missing.safetensors"), str(flower), "-o", str(tmp_path / "x.png")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()  # nothing half-written
    with pytest.raises(SystemExit) as e:
        visualize.main([str(checkpoint), str(flower), "--query", "3"])
    assert e.value.code == 2 and "expected X,Y" in capsys.readouterr().err


@pytest.mark.slow
def test_ga_masks_of_the_default_checkpoint(demo_run, tmp_path, capsys):
    """The digits GA-ShuffleNetV2 that ganet-demo trains (shared with the demo's own test), on a held-out digit."""
    from ganet.train.data import load_digits

    checkpoint = demo_run.output / "best.safetensors"
    assert demo_run.result.returncode == 0, demo_run.result.stderr[-2000:]
    digit = tmp_path / "digit.png"
    Image.fromarray(load_digits().val.images[0].permute(1, 2, 0).numpy()).save(digit)
    out = tmp_path / "ga.png"
    assert visualize.main([str(checkpoint), str(digit), "-o", str(out)]) == 0  # the command: last unit of each stage
    assert f"wrote {out}: 9 x 16 panels" in capsys.readouterr().out
    assert Image.open(out).size == expected_size(9, 16)
    assert png_array(out).reshape(-1, 3).std(axis=0).max() > 20

    drawing = visualize.visualize(checkpoint, digit, unit="first")
    assert (drawing.rows, drawing.cols) == (9, 16) and len(drawing.figure.axes) == 9 * 16
    assert [b.name for b in drawing.blocks] == ["stage2.0.attn", "stage3.0.attn", "stage4.0.attn"]
    for block, side in zip(drawing.blocks, (16, 8, 4)):  # the CIFAR form at 16x16: stage 2 keeps the resolution
        masks = block.maps
        assert {k: m.shape for k, m in masks.items()} == {k: (15, side, side) for k in ("unary", "pool", "assign")}
        np.testing.assert_allclose(masks["pool"].sum(axis=(1, 2)), 1.0, atol=1e-5)  # eq. (3): softmax over H x W
        for key in ("unary", "assign"):  # sigmoids
            assert 0.0 <= masks[key].min() and masks[key].max() <= 1.0
        assert sum(masks["unary"][g].std() > 1e-3 for g in range(15)) >= 10  # trained masks are not flat
    cells = panels(drawing, np.asarray(Image.open(io.BytesIO(drawing.png())).convert("RGB")))
    assert sum(c.reshape(-1, 3).std(axis=0).max() > 5 for c in cells) >= 0.9 * len(cells)  # not blank
    assert visualize.main([str(checkpoint), str(digit), "--unit", "9", "-o", str(tmp_path / "x.png")]) == 2
    assert "stage2 has units 1..4" in capsys.readouterr().err
