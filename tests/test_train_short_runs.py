"""ganet-train where a new user starts: one epoch, a data set smaller than a batch, several mistakes at once, and
failed runs that leave nothing behind."""
from __future__ import annotations

import json

import numpy as np
from tiny_datasets import image_folder

import ganet
from ganet.system import usable_cpus
from ganet.train.cli import main
from ganet.train.config import TrainConfig

SMALL = ["--input-size", "8", "--batch-size", "128", "--epochs", "1"]


def test_every_mistake_is_named_at_once_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--epochs", "1", "--model", "ga_shufflenet_v3", "--data", "imagefolder", "--data-dir",
                 str(tmp_path / "no-such-data"), "--lr", "0", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown model 'ga_shufflenet_v3'" in err and "ga_shufflenet_v2_cifar" in err  # lists the valid names
    assert f"{tmp_path / 'no-such-data' / 'train'} is not a folder" in err and "lr must be > 0" in err
    assert "warmup" not in err
    assert not out.exists()


def test_one_epoch_on_a_data_set_smaller_than_a_batch(tmp_path, capfd):
    """`--epochs 1` with the default warm-up of 1 epoch (it was refused), on 60 images with the default batch of 64
    (it divided by zero): both are fitted to the run with a line that says so, and the checkpoint records the data
    folder for ganet-export."""
    data = image_folder(tmp_path / "data", per_class=20)
    out = tmp_path / "run"
    defaults = TrainConfig()
    assert (defaults.batch_size, defaults.warmup_epochs, defaults.workers) == (64, 1.0, min(4, usable_cpus()))
    assert main(["--data", "imagefolder", "--data-dir", str(data), "--input-size", "8", "--epochs", "1",
                 "--output", str(out)]) == 0
    captured = capfd.readouterr()
    assert "warm-up of 1 epochs does not fit a 1-epoch run: warming up over the first 0.5 epochs" in captured.out
    assert "batch size 64 is more than the 60 training images: training with batches of 60" in captured.out
    assert "worker processes in total" not in captured.err  # torch's warning about more workers than CPUs
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and np.isfinite(metrics[0]["train_loss"])
    config = json.loads((out / "config.json").read_text())
    assert (config["warmup_epochs"], config["batch_size"]) == (0.5, 60)  # what --resume replays
    info = ganet.read_checkpoint_info(out / "best.safetensors")
    assert info.extra["data"] == "imagefolder" and info.extra["data_dir"] == str(data.resolve())


def test_failed_runs_leave_no_output(tmp_path, capfd):
    # A loss that explodes in the first epoch: no folder appears.
    out = tmp_path / "run"
    assert main(SMALL + ["--lr", "1e30", "--output", str(out)]) == 1
    assert "no checkpoint was written" in capfd.readouterr().err
    assert not out.exists()
    # A folder the user already had stays, with nothing added to it.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(SMALL + ["--lr", "1e30", "--output", str(mine)]) == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # A strict run whose first image folder batch holds a corrupt file (with more workers than CPUs: said once).
    data = image_folder(tmp_path / "data", per_class=2)
    (data / "train" / "dark" / "0.png").write_bytes(b"not a PNG")
    workers = usable_cpus() + 1
    assert main(["--data", "imagefolder", "--data-dir", str(data), "--input-size", "8", "--strict", "--workers",
                 str(workers), "--output", str(out)]) == 1
    captured = capfd.readouterr()
    assert "0.png" in captured.err and not out.exists()
    assert captured.out.count(f"--workers {workers} is more than the {usable_cpus()} CPUs") == 1
    assert "worker processes in total" not in captured.err
