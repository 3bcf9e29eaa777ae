"""ganet-train beyond the demo: presets, config files, CIFAR and image folders through the real CLI, --eval, --init,
TensorBoard, mixed precision, channels_last, and two gloo processes under torchrun."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ganet
from ganet.train.cli import main
from ganet.train.config import TrainConfig, resolve_config
from ganet.train.data import augment, draw_augmentation
from ganet.train.presets import ASSUMPTIONS, PRESETS

FAST = ["--input-size", "8", "--batch-size", "128", "--epochs", "2", "--warmup-epochs", "0.5"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ config layers
def test_presets_carry_the_papers_numbers(tmp_path):
    with pytest.raises(ValueError, match="--init"):
        resolve_config("nl-finetune")
    c100, inet = resolve_config("cifar100"), resolve_config("imagenet")
    nl = resolve_config("nl-finetune", overrides={"init": "base.safetensors"})
    assert (c100.batch_size, c100.epochs, c100.lr, c100.warmup_epochs, c100.data) == (64, 200, 0.1, 0.0, "cifar100")
    assert (nl.epochs, nl.lr, nl.model) == (100, 0.05, "nl_shufflenet_v2_cifar")
    assert (inet.batch_size, inet.epochs, inet.lr, inet.input_size) == (512, 100, 0.1, 224)
    assert set(ASSUMPTIONS) == set(PRESETS) and all(ASSUMPTIONS.values())
    for name in PRESETS:  # every preset names a real model
        ganet.model_info(PRESETS[name]["model"])
    docs = (Path(__file__).parents[1] / "docs/training.md").read_text()
    for assumption in (a for values in ASSUMPTIONS.values() for a in values):
        assert assumption in docs, f"docs/training.md does not state the assumption {assumption!r}"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_precedence_defaults_preset_file_flags(tmp_path, suffix, capsys):
    text = ("preset: cifar100\nepochs: 7\nlr: 0.2\n" if suffix == ".yaml"
            else 'preset = "cifar100"\nepochs = 7\nlr = 0.2\n')
    (tmp_path / f"c{suffix}").write_text(text)
    assert main(["--config", str(tmp_path / f"c{suffix}"), "--lr", "0.3", "--no-hflip", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["batch_size"] == 64 and cfg["data"] == "cifar100"  # preset
    assert cfg["epochs"] == 7  # file over preset
    assert cfg["lr"] == 0.3 and cfg["hflip"] is False  # flags over file


def test_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "epochz" in err
    bad.write_text("epochs: three\n")
    assert main(["--config", str(bad)]) == 2
    assert "epochs must be a int" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for name, text in (("broken.toml", "epochs = \n"), ("broken.json", "{\"epochs\": }"), ("broken.yaml", "a: [1\n")):
        broken = tmp_path / name
        broken.write_text(text)
        assert main(["--config", str(broken)]) == 2
        assert f"config file {broken} could not be parsed" in capsys.readouterr().err, name
    unknown = tmp_path / "settings.ini"
    unknown.write_text("[train]\nepochs = 1\n")
    assert main(["--config", str(unknown)]) == 2
    assert "expected a .yaml, .yml, .toml or .json file" in capsys.readouterr().err
    assert main(["--preset", "cifar100", "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "--download" in err


# --------------------------------------------------------------------------------------------------- augmentation
def test_augment_is_mirror_then_translate():
    x = torch.randn(16, 3, 6, 6)
    offsets, flips = draw_augmentation(16, 2, True, torch.Generator().manual_seed(3))
    y = augment(x, offsets, flips, 2)
    assert flips.any() and not flips.all()
    for i in range(16):
        xi = x[i].flip(-1) if flips[i] else x[i]
        dy, dx = offsets[i].tolist()
        torch.testing.assert_close(y[i], F.pad(xi, (2,) * 4)[:, dy:dy + 6, dx:dx + 6], rtol=0, atol=0)
    assert augment(x, offsets, torch.zeros(16, dtype=torch.bool), 0) is x


# ------------------------------------------------------------------------------------------------------ CIFAR path
def write_cifar10(root: Path, per_batch: int = 16) -> None:
    """A tiny CIFAR-10 in torchvision's exact layout: pickled dicts with bytes keys, rows of 3072 CHW bytes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.integers(0, 10, per_batch)
        # Class k is a flat colour k * 25 plus noise, so a few steps can learn it.
        data = (labels[:, None] * 25 + rng.integers(0, 20, (per_batch, 3072))).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_cases_per_batch": per_batch}, f,
                    protocol=2)


def test_cifar10_trains_and_evaluates_through_the_cli(tmp_path, capsys):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--input-size", "32", "--epochs", "2",
            "--batch-size", "16", "--warmup-epochs", "0", "--max-shift", "4", "--hflip", "--output", str(out)]
    assert main(args) == 0
    _, info = ganet.load_checkpoint(out / "best.safetensors")
    assert info.labels[:2] == ("airplane", "automobile") and info.num_classes == 10
    assert info.preprocessing.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    capsys.readouterr()
    assert main(["--eval", str(out / "last.safetensors"), "--data", "cifar10", "--data-dir",
                 str(tmp_path / "data")]) == 0
    result = json.loads(capsys.readouterr().out)
    # --eval (checkpoint's own preprocessing, fresh process state) reproduces the training-time evaluation.
    assert result["images"] == 16 and result["top1"] == pytest.approx(_metrics(out)[-1]["top1"], abs=1e-9)


# ------------------------------------------------------------------------------------------------ image folders
def _photo_folder(root: Path) -> None:
    from skimage import data

    photos = {"cat": [data.chelsea()], "coffee": [data.coffee()], "rocket": [data.rocket()]}
    for split in ("train", "val"):
        for cls, images in photos.items():
            (root / split / cls).mkdir(parents=True)
            for k in range((4 if cls == "rocket" else 3) if split == "train" else 1):
                Image.fromarray(images[0]).resize((40 + 8 * k, 32)).save(root / split / cls / f"{k}.jpg")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG")
    jpeg = (root / "train" / "coffee" / "0.jpg").read_bytes()
    (root / "train" / "coffee" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])


def test_imagefolder_skips_counts_and_reports_corrupt_images(tmp_path, capfd):
    _photo_folder(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), "--input-size", "32", "--epochs", "1",
              "--batch-size", "4", "--warmup-epochs", "0", "--workers", "2"]
    assert main(common + ["--output", str(out)]) == 0
    err = capfd.readouterr().err
    assert "broken.jpg" in err and "truncated.jpg" in err
    _, info = ganet.load_checkpoint(out / "best.safetensors")
    assert info.labels == ("cat", "coffee", "rocket")
    # 12 training files, 2 corrupt, batches of 4: nothing is dropped, so both bad files are met and counted.
    assert _metrics(out)[0]["skipped_images"] == 2
    assert main(common + ["--strict", "--output", str(tmp_path / "strict")]) == 1
    err = capfd.readouterr().err
    assert "stopped" in err and ("broken.jpg" in err or "truncated.jpg" in err)
    assert not (tmp_path / "strict" / "best.safetensors").exists()


# ------------------------------------------------------------------------------------------- init, TB, precision
def test_init_copies_matching_weights(tmp_path, capsys):
    assert main(FAST + ["--model", "shufflenet_v2_cifar", "--epochs", "1", "--output", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    base, _ = ganet.load_checkpoint(tmp_path / "base" / "best.safetensors")
    from ganet.train.engine import load_matching_weights

    nl = ganet.create_model("nl_shufflenet_v2_cifar", num_classes=10)
    logs = []
    load_matching_weights(nl, tmp_path / "base" / "best.safetensors", logs.append)
    theirs, mine = base.state_dict(), nl.state_dict()
    shared = [k for k in mine if k in theirs]
    assert len(shared) > 100 and all(torch.equal(mine[k], theirs[k]) for k in shared)
    assert "fresh:" in logs[0] and "attn" in logs[0]
    # The NL block's output BN starts at gamma 0: the initialised NL model computes the baseline's function.
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(nl.eval()(x), base(x), atol=1e-5, rtol=1e-5)


def test_tensorboard_events_match_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(FAST + ["--output", str(tmp_path)]) == 0
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    top1 = [e.value for e in acc.Scalars("top1")]
    assert top1 == pytest.approx([m["top1"] for m in _metrics(tmp_path)])
    assert {"train_loss", "val_loss", "lr", "images_per_s"} <= set(acc.Tags()["scalars"])


def test_channels_last_and_bf16_train_the_same_model(tmp_path):
    runs = {}
    for name, extra in {"plain": [], "nhwc": ["--channels-last"], "bf16": ["--amp", "bf16"]}.items():
        assert main(FAST + ["--epochs", "1", "--lr", "1e-4", "--output", str(tmp_path / name)] + extra) == 0
        runs[name] = _metrics(tmp_path / name)[0]
    # Same data, same order, a learning rate small enough that rounding cannot send the runs apart: the losses
    # agree to float (NHWC) and bf16 (AMP) rounding -- and differ from the plain run's bits, which a flag that
    # silently did nothing would reproduce exactly (the CPU run is deterministic).
    for name, rel in (("nhwc", 2e-3), ("bf16", 3e-2)):
        assert runs[name]["train_loss"] == pytest.approx(runs["plain"]["train_loss"], rel=rel), name
        assert runs[name]["train_loss"] != runs["plain"]["train_loss"], name


# ------------------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    """Two CPU processes under torchrun: one set of outputs, metrics reduced over both shards of the held-out set."""
    out = tmp_path / "ddp"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ganet.train.cli", *FAST, "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Wrote ") == 1 and proc.stdout.count("epoch 1/2") == 1
    assert len(_metrics(out)) == 2  # written once, by rank 0
    assert len(list((out / "tensorboard").iterdir())) == 1
    # The reduced held-out top-1 equals a single-process evaluation of the same weights on all 360 images.
    from ganet.train.engine import evaluate_checkpoint

    single, reduced = evaluate_checkpoint(out / "last.safetensors", TrainConfig(device="cpu")), _metrics(out)[-1]
    assert single["images"] == 360
    # The loss is summed over both shards: a missing or doubled shard moves it by half, rounding by ~1e-7.
    assert single["loss"] == pytest.approx(reduced["val_loss"], rel=1e-4)
    # After two epochs at 8x8 pixels the network sits near chance, with near-tied logits: CPU kernels chosen by batch
    # size (oneDNN on AVX-512 here) can flip one of them, so top-1 may differ by one image of the 360.
    assert abs(single["top1"] - reduced["top1"]) * 360 <= 1 + 1e-6


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16"], ["--compile"]])
def test_gpu_speed_options_train(tmp_path, extra):
    """On a GPU: bf16 + NHWC, fp16 with the gradient scaler, and torch.compile each train the digits, GPU-resident."""
    out = tmp_path / "gpu"
    assert main(["--device", "cuda", "--input-size", "16", "--epochs", "3", "--output", str(out)] + extra) == 0
    lines = _metrics(out)
    assert all(np.isfinite(m["train_loss"]) for m in lines) and lines[-1]["top1"] > 0.5


@pytest.mark.gpu
def test_gpu_eval_matches_training_time_evaluation(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(FAST + ["--device", "cuda", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["--eval", str(out / "last.safetensors"), "--device", "cuda"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(_metrics(out)[-1]["top1"], abs=1e-9)


def test_ddp_ranks_never_get_an_empty_training_batch():
    """Global batches sliced by rank: with several processes a short last global batch is dropped, since a rank
    with no image would compute a NaN loss that the gradient all-reduce spreads to every rank."""
    from ganet.preprocess import Preprocessing
    from ganet.train.config import TrainConfig
    from ganet.train.data import ImageTensors
    from ganet.train.engine import MemoryBatches, Runtime

    data = ImageTensors(torch.zeros(9, 3, 8, 8, dtype=torch.uint8), torch.arange(9) % 3)  # 9 = 2 * 4 + 1
    cfg = TrainConfig(input_size=8)
    for world, steps in ((1, 3), (2, 2)):
        sizes = []
        for rank in range(world):
            batches = MemoryBatches(data, Preprocessing.for_input_size(8), Runtime(torch.device("cpu"), rank, world),
                                    4, train=True, cfg=cfg)
            assert len(batches) == steps
            sizes += [len(y) for _, y, _ in batches.batches(0)]
        assert min(sizes) > 0 and sum(sizes) == (9 if world == 1 else 8), (world, sizes)
