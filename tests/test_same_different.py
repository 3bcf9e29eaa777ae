"""The same-different data set and the RelNet family: the data set's guarantees (determinism, disjoint and balanced
splits, no statistic of one glyph that tells the classes apart, glyphs farther apart than the plain backbone sees),
the backbone's receptive field measured by autograd, ganet-train on it, and the relational experiment end to end."""
import json
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch

import ganet
from ganet.models.relnet import RECEPTIVE_FIELD
from ganet.train import datasets
from ganet.train.cli import main
from ganet.train.data import preprocess_batch
from ganet.train.same_different import (GLYPH_SIZE, GLYPHS, HOLDOUT, IMAGE_SIZE, LABELS, MIN_CORNER_DISTANCE,
                                        TRAIN_SIZE, generate_same_different, load_same_different)

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def split():
    return load_same_different()  # the real sizes, as ganet-train uses them: about a second


def test_generation_is_deterministic_from_the_seed():
    a, b, c = generate_same_different(64, 3), generate_same_different(64, 3), generate_same_different(64, 4)
    for field in ("images", "targets", "glyphs", "corners", "colours"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.images, c.images)
    with pytest.raises(ValueError, match="multiple of 4, got 30"):
        generate_same_different(30)


def test_splits_shapes_balance_and_disjointness(split):
    assert (len(split.train), len(split.val)) == (TRAIN_SIZE, HOLDOUT)
    assert split.labels == LABELS == ("different", "same")
    for part in (split.train, split.val):
        assert part.images.shape == (len(part), 3, IMAGE_SIZE, IMAGE_SIZE) and part.images.dtype == torch.uint8
        assert part.targets.dtype == torch.int64 and set(part.targets.tolist()) == {0, 1}
        assert int(part.targets.sum()) * 2 == len(part)  # exactly balanced
    train = {bytes(im.numpy()) for im in split.train.images}
    val = {bytes(im.numpy()) for im in split.val.images}
    assert len(train) == TRAIN_SIZE and len(val) == HOLDOUT  # no image twice within a split
    assert not train & val  # and none in both
    prep = split.preprocessing
    assert (prep.input_size, prep.resize_size) == (32, 32)
    pixels = split.train.images.float() / 255
    torch.testing.assert_close(torch.tensor(prep.mean), pixels.mean(dim=(0, 2, 3)), atol=1e-4, rtol=0)
    again = load_same_different()
    assert torch.equal(again.val.images, split.val.images) and again.preprocessing == prep


def test_images_hold_exactly_the_two_described_glyphs():
    d = generate_same_different(200, 7)
    masks = torch.tensor([[[c == "#" for c in row] for row in g.split("|")] for g in GLYPHS])
    for i in range(len(d)):
        expected = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        for obj in range(2):
            r, c = d.corners[i, obj].tolist()
            box = masks[d.glyphs[i, obj]] * d.colours[i, obj][:, None, None]
            expected[:, r:r + GLYPH_SIZE, c:c + GLYPH_SIZE] = box
        assert torch.equal(d.images[i], expected), i
    assert torch.equal(d.targets, (d.glyphs[:, 0] == d.glyphs[:, 1]).long())
    assert (d.colours >= 64).all()  # every glyph pixel is visible on the black background


def test_one_glyph_alone_says_nothing_about_the_label():
    """The property that makes the relation non-local: each (glyph, colour, position) occurs exactly as often in
    'same' as in 'different' images, so the image with either glyph erased, the glyph counts, the colour histogram,
    the ink and the mean image are the same for both classes."""
    d = generate_same_different(2000, 11)
    tokens = {label: Counter() for label in (0, 1)}
    for i in range(len(d)):
        for obj in range(2):
            key = (int(d.glyphs[i, obj]), tuple(d.corners[i, obj].tolist()), tuple(d.colours[i, obj].tolist()))
            tokens[int(d.targets[i])][key] += 1
    assert tokens[0] == tokens[1]
    same, diff = d.images[d.targets == 1].double(), d.images[d.targets == 0].double()
    assert torch.equal(same.sum(0), diff.sum(0))  # the mean image, hence every colour statistic
    assert Counter(d.glyphs[d.targets == 1].flatten().tolist()) == Counter(d.glyphs[d.targets == 0].flatten().tolist())
    # ... while the pair decides: 'same' images pair equal glyphs, 'different' ones never do
    assert (d.glyphs[d.targets == 1, 0] == d.glyphs[d.targets == 1, 1]).all()
    assert (d.glyphs[d.targets == 0, 0] != d.glyphs[d.targets == 0, 1]).all()


def test_glyphs_lie_farther_apart_than_the_plain_backbone_sees(split):
    d = generate_same_different(4000, 0)
    gap = (d.corners[:, 0] - d.corners[:, 1]).abs().max(dim=1).values - (GLYPH_SIZE - 1)
    assert MIN_CORNER_DISTANCE == RECEPTIVE_FIELD + GLYPH_SIZE - 1
    assert gap.min() >= RECEPTIVE_FIELD  # no RECEPTIVE_FIELD-wide window holds pixels of both glyphs
    # and the glyphs are not always at the same distance or in the same places
    assert gap.max() >= 2 * RECEPTIVE_FIELD and len(set(map(tuple, d.corners.flatten(0, 1).tolist()))) > 500


def test_relnet_receptive_field_is_what_the_data_set_assumes():
    """Autograd: a feature of the plain RelNet before the global pool depends on an 11x11 window of the input."""
    model = ganet.create_model("relnet").double().eval()
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64, requires_grad=True)
    features = model.forward_features(x)  # (4, 128, 8, 8)
    assert features.shape[-2:] == (8, 8)
    for i, j in [(4, 4), (3, 5), (0, 7)]:
        grad, = torch.autograd.grad(features[:, :, i, j].sum(), x, retain_graph=True)
        rows, cols = grad.abs().sum(dim=(0, 1)).nonzero().unbind(1)
        assert rows.max() - rows.min() + 1 <= RECEPTIVE_FIELD and cols.max() - cols.min() + 1 <= RECEPTIVE_FIELD
    grad, = torch.autograd.grad(features[:, :, 4, 4].sum(), x)
    rows, cols = grad.abs().sum(dim=(0, 1)).nonzero().unbind(1)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (RECEPTIVE_FIELD, RECEPTIVE_FIELD)


def _randomised(name: str) -> torch.nn.Module:
    """A model in eval mode with BN statistics and GA's alpha moved off their identity init."""
    torch.manual_seed(1)
    model = ganet.create_model(name).double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
        if hasattr(m, "alpha"):
            m.alpha.data.fill_(1.0)
    return model.eval()


def test_plain_relnet_pools_the_same_mean_features_from_both_classes(split):
    """The data set and the backbone together: the plain RelNet's pooled features, averaged over the 'same' images,
    equal their average over the 'different' ones (any weights), so no linear classifier on them beats a constant
    guess in cross-entropy. A block with a path across the image (GA) breaks the equality."""
    d = generate_same_different(256, 5)
    x = preprocess_batch(d.images, split.preprocessing).double()

    def class_gap(name: str) -> float:
        model = _randomised(name)
        with torch.no_grad():
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)  # (256, 128)
        return float((pooled[d.targets == 1].mean(0) - pooled[d.targets == 0].mean(0)).abs().max())

    assert class_gap("relnet") < 1e-12
    assert class_gap("ga_relnet") > 1e-6


def test_ganet_train_accepts_it(tmp_path, monkeypatch, capsys):
    small = partial(load_same_different, train_size=256, holdout=128)  # the real generator, fewer images
    monkeypatch.setattr(datasets, "load_same_different", small)
    out = tmp_path / "run"
    assert main(["--data", "same-different", "--input-size", "32", "--model", "relnet", "--epochs", "1",
                 "--batch-size", "64", "--warmup-epochs", "0", "--output", str(out)]) == 0
    assert (out / "best.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and 0 <= metrics[0]["top1"] <= 1
    capsys.readouterr()
    assert main(["--eval", str(out / "best.safetensors"), "--data", "same-different"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["images"] == 128 and evaluated["top1"] == pytest.approx(metrics[0]["top1"])
    # the default input size (16, the digits') would shrink the glyphs' distance below the receptive field
    assert main(["--data", "same-different", "--model", "relnet", "--output", str(tmp_path / "x")]) == 2
    assert "pass --input-size 32 or --preset same-different" in capsys.readouterr().err
    assert main(["--preset", "same-different", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["data"], cfg["model"], cfg["input_size"], cfg["max_shift"]) == ("same-different", "ga_relnet", 32, 0)


@pytest.mark.slow
def test_relational_experiment_end_to_end(tmp_path):
    """benchmarks/relational.py on a tiny configuration writes its table, results and figure (no winner is
    asserted: the numbers belong in docs/models.md)."""
    out = tmp_path / "relational"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/relational.py"), "--variants", "relnet,nl_relnet", "--seeds", "2",
         "--epochs", "1", "--train-size", "128", "--holdout", "64", "--output", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out}/results.json" in result.stdout
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| variant | model | params | MMACs | ms / step | held-out top-1")
    assert [row.split("|")[2].strip() for row in table[2:]] == ["`relnet`", "`nl_relnet`"]
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["model"], r["seed"]) for r in results["runs"]) == [
        ("nl_relnet", 0), ("nl_relnet", 1), ("relnet", 0), ("relnet", 1)]
    plain = next(r for r in results["rows"] if r["model"] == "relnet")
    assert plain["params"] == sum(p.numel() for p in ganet.create_model("relnet").parameters())
    assert plain["macs"] > 0 and plain["step_ms"] > 0 and len(plain["top1_per_seed"]) == 2
    png = (out / "relational.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 200_000
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/relational.py"), "--variants", "resnet"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "unknown variants ['resnet']" in bad.stderr
