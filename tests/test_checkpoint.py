"""The one checkpoint format: round trip, the clear errors, atomic writes, and a torch-free reader."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import ganet
from ganet.checkpoint import FORMAT_VERSION, CheckpointError, read_checkpoint_info
from ganet.preprocess import Preprocessing

LABELS = [f"class {i}" for i in range(10)]


@pytest.fixture
def trained(tmp_path):
    """A GA model whose every parameter and BN statistic is off its init, saved once."""
    model = ganet.create_model("ga_shufflenet_v2_cifar", num_classes=10, attn_kwargs={"groups": 15})
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    prep = Preprocessing(32, 36, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic")
    path = ganet.save_checkpoint(tmp_path / "ck.safetensors", model, "ga_shufflenet_v2_cifar", labels=LABELS,
                                 preprocessing=prep, model_kwargs={"attn_kwargs": {"groups": 15}},
                                 extra={"epoch": 3})
    return model.eval(), path, prep


def test_round_trip(trained):
    model, path, prep = trained
    loaded, info = ganet.load_checkpoint(path)
    assert info.model == "ga_shufflenet_v2_cifar" and info.num_classes == 10
    assert info.labels == tuple(LABELS) and info.preprocessing == prep
    assert info.model_kwargs == {"attn_kwargs": {"groups": 15}} and info.extra == {"epoch": 3}
    assert info.format_version == FORMAT_VERSION
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training


def test_model_kwargs_rebuild_the_same_architecture(tmp_path):
    model = ganet.create_model("ga_shufflenet_v2_cifar", num_classes=4, attn_kwargs={"use_u4p": False})
    path = ganet.save_checkpoint(tmp_path / "a.safetensors", model, "ga_shufflenet_v2_cifar",
                                 model_kwargs={"attn_kwargs": {"use_u4p": False}})
    loaded, info = ganet.load_checkpoint(path)
    assert info.labels == ("0", "1", "2", "3")
    assert not any(getattr(m, "use_u4p", False) for m in loaded.modules())


def expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        ganet.load_checkpoint(path)
    assert str(path) in str(e.value)  # the message names the file


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "no such file")


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_truncated_file(trained, tmp_path, keep):
    _, path, _ = trained
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:-7])
    expect_error(cut, "truncated")


def test_not_safetensors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"oops" + b"\0" * 8)
    expect_error(junk, "not a safetensors file")
    pickled = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(3)}, pickled)
    with pytest.raises(CheckpointError):
        ganet.load_checkpoint(pickled)


def test_foreign_safetensors(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, foreign, metadata={"format": "pt"})
    expect_error(foreign, "not a ganet checkpoint")


def rewrite_metadata(src, dst, **changes):
    from safetensors.torch import load_file

    header_len = struct.unpack("<Q", src.read_bytes()[:8])[0]
    meta = json.loads(src.read_bytes()[8:8 + header_len])["__metadata__"]
    meta.update(changes)
    save_file(load_file(src), dst, metadata=meta)
    return dst


def test_newer_format_version(trained, tmp_path):
    _, path, _ = trained
    newer = rewrite_metadata(path, tmp_path / "newer.safetensors", format_version=str(FORMAT_VERSION + 1))
    expect_error(newer, "newer ganet.*upgrade")


def test_bad_metadata(trained, tmp_path):
    _, path, _ = trained
    expect_error(rewrite_metadata(path, tmp_path / "a.safetensors", labels='["only one"]'), "1 labels for 10 classes")
    expect_error(rewrite_metadata(path, tmp_path / "b.safetensors", model="resnet50"), "cannot build its model")
    expect_error(rewrite_metadata(path, tmp_path / "c.safetensors", preprocessing='{"input_size": 32}'),
                 "invalid metadata")
    expect_error(rewrite_metadata(path, tmp_path / "d.safetensors", model="shufflenet_v2_cifar"),
                 "weights do not match")


def test_save_refuses_wrong_label_count(tmp_path):
    model = ganet.create_model("shufflenet_v2_cifar", num_classes=3)
    with pytest.raises(ValueError, match="2 labels for a model with 3 classes"):
        ganet.save_checkpoint(tmp_path / "x.safetensors", model, "shufflenet_v2_cifar", labels=["a", "b"])
    assert not list(tmp_path.iterdir())  # nothing written


def test_reader_needs_no_torch(trained):
    _, path, _ = trained
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        sys.modules["torchvision"] = None
        import ganet
        info = ganet.read_checkpoint_info({str(path)!r})
        assert info.labels[3] == "class 3" and info.preprocessing.interpolation == "bicubic"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_kill_during_save_keeps_the_previous_file(tmp_path):
    """SIGKILL a process that saves in a loop: the file is always a complete checkpoint, old or new."""
    path = tmp_path / "last.safetensors"
    code = textwrap.dedent(f"""
        import sys, torch, ganet
        model = ganet.create_model("ga_shufflenet_v2", num_classes=1000)  # ~10 MB: a save takes a while
        torch.nn.init.zeros_(model.fc.bias)
        ganet.save_checkpoint({str(path)!r}, model, "ga_shufflenet_v2")
        print("ready", flush=True)
        while True:
            with torch.no_grad():
                model.fc.bias.add_(1)
            ganet.save_checkpoint({str(path)!r}, model, "ga_shufflenet_v2")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        import time

        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    model, info = ganet.load_checkpoint(path)  # complete and loadable
    assert info.model == "ga_shufflenet_v2"
    bias = model.fc.bias
    assert torch.all(bias == bias[0])  # one consistent save, not a mix of two
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.safetensors"]
    assert all(name.endswith(".tmp") for name in leftovers)  # at most the interrupted temp file


def test_read_checkpoint_info_matches_load(trained):
    _, path, _ = trained
    assert read_checkpoint_info(path) == ganet.load_checkpoint(path)[1]
