"""ganet-train on the embedded default: outputs, exact resume after a real kill, the checkpoint contract."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import ganet
from ganet.train.cli import main
from ganet.train.config import TrainConfig
from ganet.train.data import DIGITS_HOLDOUT, load_digits, preprocess_batch
from ganet.train.engine import _load_state, _save_state, learning_rate, make_optimizer

FAST = ["--input-size", "8", "--batch-size", "128", "--epochs", "3", "--warmup-epochs", "0.5"]


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.targets, b.train.targets)
    assert len(a.val) == DIGITS_HOLDOUT and len(a.train) == 1797 - DIGITS_HOLDOUT
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (3, 8, 8)
    assert a.labels == tuple(str(i) for i in range(10))
    train_set = {bytes(x.numpy()) for x in a.train.images}
    assert sum(bytes(x.numpy()) in train_set for x in a.val.images) < 5  # (digits has a few exact duplicates)


def test_preprocess_batch_follows_the_definition():
    split = load_digits(16)
    x = preprocess_batch(split.val.images[:4], split.preprocessing)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    raw = split.val.images[:4].float() / 255
    up = torch.nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, (up - 0.3053) / 0.3760)


def test_learning_rate_schedule():
    cfg = TrainConfig(epochs=4, lr=0.2, warmup_epochs=1)
    lrs = [learning_rate(cfg, s, 10) for s in range(40)]
    assert lrs[9] == pytest.approx(0.2) and lrs[0] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_short_run_writes_every_output(tmp_path, capsys):
    assert main(FAST + ["--output", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no TTY, no progress bar
    assert f"ganet-export {tmp_path}/best.safetensors" in out
    for name in ("best.safetensors", "last.safetensors", "last.state.safetensors", "metrics.jsonl", "config.json"):
        assert (tmp_path / name).is_file(), name
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    assert {"train_loss", "top1", "top5", "lr", "images_per_s"} <= set(lines[0])
    model, info = ganet.load_checkpoint(tmp_path / "best.safetensors")
    assert info.model == "ga_shufflenet_v2_cifar" and info.labels == tuple("0123456789")
    assert info.preprocessing.input_size == 8 and info.extra["top1"] == max(m["top1"] for m in lines)
    assert json.loads((tmp_path / "config.json").read_text())["input_size"] == 8


def test_resume_after_kill_is_bitwise_exact(tmp_path):
    """Kill -9 a run after its first epoch, resume it, and compare with an uninterrupted run: identical weights."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # Every run in a fresh process with the same environment: bitwise equality needs the same thread count, and
    # other tests in this process may have changed torch's (a serving backend sets it).
    cli = [sys.executable, "-m", "ganet.train.cli"]
    two_epochs = FAST + ["--epochs", "2"]  # killed after the first, resumed into the second (the last flag wins)
    subprocess.run(cli + two_epochs + ["--output", str(whole)], check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen([sys.executable, "-m", "ganet.train.cli", *two_epochs, "--output", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert metrics.read_text().count("\n") < 2, "the run finished before it could be killed"

    subprocess.run(cli + ["--resume", str(killed)], check=True, capture_output=True, timeout=300)
    a, b = load_file(whole / "last.safetensors"), load_file(killed / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_state_survives_the_state_file_exactly(tmp_path, optimizer):
    """The optimizer's state (SGD's momentum; AdamW's moments and step counts) goes through last.state.safetensors
    and comes back exactly: a restored copy takes the same next step, bit for bit, as the original."""
    cfg = TrainConfig(optimizer=optimizer, lr=0.01)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))

    def step(model, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    model = ganet.create_model("ga_shufflenet_v2_cifar", num_classes=10)
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        step(model, opt)
    _save_state(tmp_path / "state.safetensors", model, opt, scaler, 0, 0.5, "{}")
    saved = {k.split(".", 1)[0] for k in load_file(tmp_path / "state.safetensors")} - {"model"}
    assert saved == {"sgd": {"momentum"}, "adamw": {"adamw_exp_avg", "adamw_exp_avg_sq", "adamw_step"}}[optimizer]

    restored = ganet.create_model("ga_shufflenet_v2_cifar", num_classes=10)
    restored_opt = make_optimizer(cfg, restored)
    assert _load_state(tmp_path / "state.safetensors", restored, restored_opt, scaler)[:2] == (1, 0.5)
    model.train(), restored.train()
    step(model, opt)
    step(restored, restored_opt)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, capsys):
    assert main(FAST + ["--lr", "1e30", "--output", str(tmp_path)]) == 1
    assert "stopped: loss is" in capsys.readouterr().err


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    assert main(["--data", "imagenet", "--output", str(tmp_path)]) == 2
    assert "data must be one of digits, cifar10, cifar100, imagefolder" in capsys.readouterr().err
    assert main(["--amp", "fp8", "--output", str(tmp_path)]) == 2
    assert "amp must be one of" in capsys.readouterr().err
    assert main(["--optimizer", "adam", "--output", str(tmp_path)]) == 2
    assert "optimizer must be one of sgd, adamw; got 'adam'" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path), "--preset", "cifar100"]) == 2
    assert "drop --preset/--config" in capsys.readouterr().err

# The default run's >= 95% held-out top-1 is checked by tests/test_preprocess_and_cli.py's ganet-demo test.


def test_resume_restores_a_metrics_line_lost_or_torn_by_a_kill(tmp_path):
    """A kill after the state is saved but before (or while) its metrics line is appended: --resume writes the
    line back from the state, and drops the torn fragment."""
    assert main(FAST + ["--output", str(tmp_path)]) == 0
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:17])  # the last line cut mid-write
    assert main(["--resume", str(tmp_path)]) == 0
    assert metrics.read_text().splitlines() == lines
    metrics.write_text("\n".join(lines[:-1]) + "\n")  # the last line never written
    assert main(["--resume", str(tmp_path)]) == 0
    assert metrics.read_text().splitlines() == lines
