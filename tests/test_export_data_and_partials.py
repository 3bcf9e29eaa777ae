"""ganet-export reaches the checkpoint's own data (the folder ganet-train records, or --data-dir) for parity and the
INT8 gate, says so when it cannot, and removes the build directories that killed exports left behind, never a
running export's."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny_datasets import image_folder

from ganet.checkpoint import read_checkpoint_info
from ganet.export import cli
from ganet.export.data import DataUnavailableError, resolve_export_data
from ganet.export.manifest import load_manifest
from ganet.export.partial import process_start_time, remove_stale_partials


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, checkpoint): the baseline ShuffleNetV2 trained 4 short epochs on 3 x 20 images by ganet-train."""
    from ganet.train.cli import main

    root = tmp_path_factory.mktemp("folder")
    data = image_folder(root / "data", per_class=20)
    assert main(["--model", "shufflenet_v2_cifar", "--data", "imagefolder", "--data-dir", str(data), "--input-size",
                 "8", "--epochs", "4", "--batch-size", "12", "--workers", "0", "--output", str(root / "run")]) == 0
    return data, root / "run" / "best.safetensors"


def test_the_recorded_folder_is_found_and_checked(folder_run, tmp_path):
    data, checkpoint = folder_run
    info = read_checkpoint_info(checkpoint)
    found = resolve_export_data(info.extra, info.preprocessing, info.labels)
    assert found.reachable and found.name == "imagefolder" and found.data_dir == str(data.resolve())
    assert len(found.heldout) == 6 and sorted(found.heldout.targets.tolist()) == [0, 0, 1, 1, 2, 2]
    assert found.heldout.names[0] == "imagefolder-val:dark/0.png"
    images, what = found.calibration(4)
    assert images.shape == (4, 3, 8, 8) and "training split" in what and "4 evenly spaced" in what
    assert len(resolve_export_data(info.extra, info.preprocessing, info.labels, heldout_limit=3).heldout) == 3

    # Older checkpoints record no folder; a moved folder is gone: both fall back to the photographs and say so.
    old = {k: v for k, v in info.extra.items() if k != "data_dir"}
    note = resolve_export_data(old, info.preprocessing, info.labels).note
    assert "records no folder for its imagefolder data; pass --data-dir" in note and "not gated" in note
    moved = shutil.copytree(data, tmp_path / "moved")
    gone = info.extra | {"data_dir": str(tmp_path / "elsewhere")}
    assert not resolve_export_data(gone, info.preprocessing, info.labels).reachable
    assert resolve_export_data(gone, info.preprocessing, info.labels, data_dir=moved).reachable  # --data-dir
    # A --data-dir that cannot be used is an error, not a silent fallback.
    other = image_folder(tmp_path / "other", per_class=1, classes=("a", "b", "c"))
    with pytest.raises(DataUnavailableError, match="are not the checkpoint's labels"):
        resolve_export_data(info.extra, info.preprocessing, info.labels, data_dir=other)
    with pytest.raises(DataUnavailableError, match="is not a folder"):
        resolve_export_data(info.extra, info.preprocessing, info.labels, data_dir=tmp_path / "nothing")


def _hold_partial(output: Path) -> subprocess.Popen:
    """A real process that makes its build directory beside ``output`` the way an export does, then waits."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from ganet.export.partial import make_partial_dir
        (make_partial_dir(Path({str(output)!r})) / "model.onnx").write_bytes(bytes(1 << 20))
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_stale_partials_go_and_a_running_exports_stay(tmp_path):
    out = tmp_path / "export"
    killed, running = _hold_partial(out), _hold_partial(out)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    # A directory whose pid is alive but belongs to another process now (the pid was reused): stale as well.
    reused = tmp_path / f".export.{os.getpid()}-{process_start_time(os.getpid()) + 1}.abcd1234.partial"
    reused.mkdir()
    other_output = tmp_path / f".export2.{killed.pid}-1.abcd1234.partial"  # another DIR's: not this export's to judge
    other_output.mkdir()
    try:
        partials = {p.name.split(".")[2].split("-")[0]: p for p in tmp_path.glob(".export.*.partial")}
        assert set(partials) == {str(killed.pid), str(running.pid), str(os.getpid())}
        logs: list[str] = []
        removed = remove_stale_partials(out, logs.append)
        assert sorted(removed) == sorted([partials[str(killed.pid)], reused])
        assert partials[str(running.pid)].is_dir() and other_output.is_dir()
        assert any(f"left by export process {killed.pid}, which is no longer running" in line and "1.0 MB" in line
                   for line in logs)
    finally:
        running.kill()
        running.wait()
    assert remove_stale_partials(out, lambda _: None) == [partials[str(running.pid)]]


def test_export_gates_int8_on_the_recorded_folder_and_cleans_up(folder_run, tmp_path, capsys):
    """The real export: a killed export's directory beside DIR is removed; parity runs on the photographs and the
    folder's held-out images; INT8 is calibrated on the folder's training split and gated on its held-out split;
    --verify rebuilds the same inputs."""
    data, checkpoint = folder_run
    out = tmp_path / "export"
    killed = _hold_partial(out)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    t0 = time.monotonic()
    assert cli.main([str(checkpoint), "--output", str(out), "--int8", "--max-batch", "2", "--benchmark-rounds", "0",
                     "--calibration-images", "30"]) == 0
    print(f"export: {time.monotonic() - t0:.1f} s")
    logged = capsys.readouterr().out
    assert f"held-out split of imagefolder in {data.resolve()}: 6 of 6 images" in logged
    assert f"left by export process {killed.pid}" in logged
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    m = load_manifest(out)
    inputs = m.parity["inputs"]
    assert (inputs["count"], inputs["dataset_heldout"], inputs["data_dir"]) == (9 + 6, "imagefolder",
                                                                                 str(data.resolve()))
    held = m.parity["onnx_int8"]["heldout"]
    assert held["dataset"] == "imagefolder" and held["images"] == 6 and m.parity["onnx_int8"]["passed"] is True
    assert "imagefolder training split" in m.artifact("onnx_int8").info["quantization"]["calibration_set"]
    assert cli.main(["--verify", str(out)]) == 0
    assert "OK (files, contract and parity match" in capsys.readouterr().out
    # --data-dir that is not the checkpoint's data: one line, exit 2, nothing written.
    other = image_folder(tmp_path / "other", per_class=1, classes=("a", "b", "c"))
    assert cli.main([str(checkpoint), "--output", str(tmp_path / "o2"), "--data-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-dir" in err and "are not the checkpoint's labels" in err
    assert not (tmp_path / "o2").exists()
    assert json.loads((out / "manifest.json").read_text())["checkpoint"]["extra"]["data"] == "imagefolder"


@pytest.mark.parametrize("cuda,expected", [("13.0", "pip install tensorrt-cu13 'cuda-python>=13,<14'"),
                                           ("12.6", "pip install tensorrt-cu12 'cuda-python>=12,<13'"),
                                           (None, "tensorrt-cu12 'cuda-python>=12,<13' (CUDA 12) or pip install "
                                                  "tensorrt-cu13")])
def test_tensorrt_install_hint_follows_torchs_cuda(monkeypatch, cuda, expected):
    """--trt without TensorRT suggested tensorrt-cu12 beside a CUDA 13 torch: the package now follows
    torch.version.cuda, and names both where torch has no CUDA (or is not imported, as on a serving host)."""
    import torch

    from ganet.export.tensorrt import install_command

    monkeypatch.setattr(torch.version, "cuda", cuda)
    assert expected in install_command()
    monkeypatch.setitem(sys.modules, "torch", None)
    assert "tensorrt-cu12" in install_command() and "tensorrt-cu13" in install_command()
