"""CIFAR in torchvision's exact on-disk format, image folders with corrupt files, and the data set registry.

Every file is real and written to tmp_path: CIFAR batches are Python-2-style pickles (as the real ones are) of crops
of scikit-learn's china.jpg; the image folders hold scikit-image photographs. Nothing is downloaded.
"""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ganet.preprocess import CIFAR10_MEAN, CIFAR10_STD, CIFAR_MEAN, CIFAR_STD, Preprocessing, image_to_uint8
from ganet.train.data import DataSplit
from ganet.train.datasets import (DATASETS, BadSample, CorruptImageError, DatasetFormatError, DatasetNotFoundError,
                                  FolderSplit, build_dataset, collate_skip_bad, load_cifar, load_imagefolder)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 20


# ------------------------------------------------------------------------------------------- CIFAR fixtures

class _U8:
    """Marker: pickle numpy's uint8 dtype here."""


def py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) wrote CIFAR's files: str as 8-bit strings (opcodes U/T,
    which Python 3 decodes with the unpickler's ``encoding``, so keys are b"data" under encoding="bytes" and "data"
    under "latin1"), NumPy arrays through numpy.core.multiarray._reconstruct with their raw bytes as a string."""
    out = bytearray(b"\x80\x02")

    def put(o):
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"K" + bytes([o]) if 0 <= o < 256 else
                       b"M" + struct.pack("<H", o) if 0 <= o < 65536 else b"J" + struct.pack("<i", o))
        elif isinstance(o, (str, bytes)):
            b = o.encode("latin1") if isinstance(o, str) else o
            out.extend((b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b)
        elif isinstance(o, tuple):
            if 1 <= len(o) <= 3:
                for x in o:
                    put(x)
                out.extend(b"\x85\x86\x87"[len(o) - 1:len(o)])
            else:
                out.extend(b"(")
                for x in o:
                    put(x)
                out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"](")
            for x in o:
                put(x)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")
        elif o is _U8:
            out.extend(b"cnumpy\ndtype\n")
            put(("u1", 0, 1))
            out.extend(b"R")
            put((3, "|", None, None, None, -1, -1, 0))
            out.extend(b"b")
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            put((0,))
            put("b")
            out.extend(b"\x87R")
            put((1, o.shape, _U8, False, o.tobytes()))
            out.extend(b"b")
        else:
            raise TypeError(type(o))

    put(obj)
    out.extend(b".")
    return bytes(out)


def china_crops(n: int, seed: int) -> np.ndarray:
    """n real 32x32 RGB crops (n, 32, 32, 3) uint8 of sklearn's china.jpg."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")  # (427, 640, 3)
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, 427 - 32, n), rng.integers(0, 640 - 32, n)
    return np.stack([photo[y:y + 32, x:x + 32] for y, x in zip(ys, xs)])


def as_rows(crops: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072): the R plane, then G, then B."""
    return np.ascontiguousarray(crops.transpose(0, 3, 1, 2).reshape(len(crops), 3072))


def write_cifar10(root, seed=0):
    """A tiny CIFAR-10 with the real file names and keys: 5 x 20 training images, 20 test images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    crops = china_crops(6 * PER_BATCH, seed)
    labels = [int(v) for v in np.random.default_rng(seed + 1).integers(0, 10, len(crops))]
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        part = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        (folder / name).write_bytes(py2_pickle({
            "batch_label": f"batch {i + 1} of 5" if name != "test_batch" else "testing batch 1 of 1",
            "labels": labels[part], "data": as_rows(crops[part]),
            "filenames": [f"img_{j}.png" for j in range(PER_BATCH)]}))
    (folder / "batches.meta").write_bytes(py2_pickle(
        {"num_cases_per_batch": PER_BATCH, "label_names": CIFAR10_NAMES, "num_vis": 3072}))
    return crops, np.array(labels)


def write_cifar100(root, seed=0):
    """A tiny CIFAR-100: 40 training images in ``train``, 20 in ``test``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    crops = china_crops(60, seed)
    fine = [int(v) for v in np.random.default_rng(seed + 1).integers(0, 100, len(crops))]
    for name, part in (("train", slice(0, 40)), ("test", slice(40, 60))):
        (folder / name).write_bytes(py2_pickle({
            "filenames": [f"img_{j}.png" for j in range(len(fine[part]))], "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": fine[part], "coarse_labels": [v // 5 for v in fine[part]], "data": as_rows(crops[part])}))
    (folder / "meta").write_bytes(py2_pickle({"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
                                              "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]}))
    return crops, np.array(fine)


def torchvision_reads(monkeypatch, cls, root, train):
    """torchvision's own reader on our tiny folder. Its integrity check compares MD5s with the real 50,000-image
    files, which a tiny folder cannot match, so the check is patched out; the reading code itself is unchanged."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    return cls(str(root), train=train, download=False)


# ------------------------------------------------------------------------------------------------ CIFAR tests

def test_cifar10_reads_torchvision_format_exactly(tmp_path, monkeypatch):
    crops, labels = write_cifar10(tmp_path)
    split = load_cifar("cifar10", tmp_path)
    assert isinstance(split, DataSplit)
    assert split.train.images.shape == (100, 3, 32, 32) and split.val.images.shape == (20, 3, 32, 32)
    assert split.train.images.dtype == torch.uint8 and split.train.targets.dtype == torch.int64
    chw = torch.from_numpy(crops.transpose(0, 3, 1, 2).copy())
    assert torch.equal(split.train.images, chw[:100]) and torch.equal(split.val.images, chw[100:])
    # One pixel by hand: image 7, row 5, column 9 -- the row's bytes 0..1023 are R, 1024..2047 G, 2048..3071 B.
    row = as_rows(crops[7:8])[0]
    assert [int(v) for v in split.train.images[7, :, 5, 9]] == [row[5 * 32 + 9], row[1024 + 5 * 32 + 9],
                                                                  row[2048 + 5 * 32 + 9]] == list(crops[7, 5, 9])
    assert split.train.targets.tolist() == labels[:100].tolist() and split.val.targets.tolist() == labels[100:].tolist()
    assert split.labels == tuple(CIFAR10_NAMES)
    assert split.preprocessing == Preprocessing(32, 32, CIFAR10_MEAN, CIFAR10_STD, "bilinear")
    from torchvision.datasets import CIFAR10

    for train, ours in ((True, split.train), (False, split.val)):
        tv = torchvision_reads(monkeypatch, CIFAR10, tmp_path, train)
        assert np.array_equal(tv.data, ours.images.permute(0, 2, 3, 1).numpy())  # torchvision keeps HWC
        assert tv.targets == ours.targets.tolist() and tuple(tv.classes) == split.labels


def test_cifar100_reads_torchvision_format_exactly(tmp_path, monkeypatch):
    crops, fine = write_cifar100(tmp_path)
    split = load_cifar("cifar100", tmp_path)
    assert split.train.images.shape == (40, 3, 32, 32) and split.val.images.shape == (20, 3, 32, 32)
    chw = torch.from_numpy(crops.transpose(0, 3, 1, 2).copy())
    assert torch.equal(split.train.images, chw[:40]) and torch.equal(split.val.images, chw[40:])
    assert split.train.targets.tolist() == fine[:40].tolist() and split.val.targets.tolist() == fine[40:].tolist()
    assert split.labels == tuple(f"fine_{i:02d}" for i in range(100))
    assert split.preprocessing == Preprocessing(32, 32, CIFAR_MEAN, CIFAR_STD, "bilinear")
    from torchvision.datasets import CIFAR100

    tv = torchvision_reads(monkeypatch, CIFAR100, tmp_path, train=False)
    assert np.array_equal(tv.data, split.val.images.permute(0, 2, 3, 1).numpy()) and tv.targets == fine[40:].tolist()


def test_fixture_has_the_real_files_byte_keys(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].shape == (PER_BATCH, 3072) and entry[b"data"].dtype == np.uint8


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("key_type", [str, bytes])
def test_cifar_written_by_python3_also_reads(tmp_path, protocol, key_type):
    crops, labels = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    k = (lambda s: s.encode()) if key_type is bytes else (lambda s: s)
    (folder / "test_batch").write_bytes(pickle.dumps(
        {k("data"): as_rows(crops[100:]), k("labels"): labels[100:].tolist()}, protocol=protocol))
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {k("label_names"): [k(n) for n in CIFAR10_NAMES]}, protocol=protocol))
    split = load_cifar("cifar10", tmp_path)
    assert torch.equal(split.val.images, torch.from_numpy(crops[100:].transpose(0, 3, 1, 2).copy()))
    assert split.labels == tuple(CIFAR10_NAMES)


def test_cifar_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_cifar("cifar100", tmp_path / "data")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert str(tmp_path / "data" / "cifar-100-python") in msg and "--download" in msg
    assert "does not exist" in msg and "train, test, meta" in msg


def test_cifar_missing_batch_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing: data_batch_3\)"):
        load_cifar("cifar10", tmp_path)


def _corrupt(folder, name):
    """Ways a batch file can be foreign or damaged; each returns the text the error must contain."""
    path = folder / "data_batch_2"
    good = path.read_bytes()
    if name == "truncated":
        path.write_bytes(good[:len(good) // 2])
        return "not a readable CIFAR-10 file"
    if name == "foreign_keys":
        path.write_bytes(pickle.dumps({"images": np.zeros((2, 3072), np.uint8), "targets": [0, 1]}))
        return "has keys ['images', 'targets']"
    if name == "wrong_shape":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}))
        return "uint8 array of shape (2, 1024)"
    if name == "label_count":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1, 2]}))
        return "for 2 images"
    if name == "label_range":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}))
        return "labels span [0, 10]"
    if name == "not_a_dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
        return "holds a list"
    if name == "code":  # a pickle that would run a command: refused before anything runs
        marker = folder / "pwned"
        path.write_bytes(b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
        return "refusing to load os.system"
    if name == "text":
        path.write_text("this is not a pickle\n")
        return "not a readable CIFAR-10 file"
    raise ValueError(name)


@pytest.mark.parametrize("kind", ["truncated", "foreign_keys", "wrong_shape", "label_count", "label_range",
                                  "not_a_dict", "code", "text"])
def test_cifar_foreign_or_corrupt_batch_is_a_format_error(tmp_path, kind):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    expected = _corrupt(folder, kind)
    with pytest.raises(DatasetFormatError) as e:
        load_cifar("cifar10", tmp_path)
    assert isinstance(e.value, ValueError)
    assert str(folder / "data_batch_2") in str(e.value) and expected in str(e.value)
    assert not (folder / "pwned").exists()


def test_cifar_meta_with_wrong_class_count(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(py2_pickle({"label_names": CIFAR10_NAMES[:9]}))
    with pytest.raises(DatasetFormatError, match="batches.meta.*length 9.*10 class names"):
        load_cifar("cifar10", tmp_path)


def test_cifar_download_goes_through_torchvision_only_when_asked(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:  # stands in for the network: records the call and writes the files
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_cifar10(tmp_path)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    with pytest.raises(DatasetNotFoundError):
        load_cifar("cifar10", tmp_path)
    assert calls == []
    assert len(load_cifar("cifar10", tmp_path, download=True).train) == 100
    assert calls == [(str(tmp_path), True, True)]


# ------------------------------------------------------------------------------------------ image folder fixtures

def photo(name: str, size=(64, 48)) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).resize(size, Image.Resampling.BILINEAR)


@pytest.fixture
def folder(tmp_path):
    """train/{cat,coffee,rocket} and val/{cat,rocket} with real photographs (JPEG, PNG, a palette GIF, an upper-case
    .JPEG) plus three corrupt files, a hidden image and a non-image file in train/cat."""
    root = tmp_path / "imgs"
    for d in ("train/cat/sub", "train/coffee", "train/rocket", "val/cat", "val/rocket"):
        (root / d).mkdir(parents=True)
    cat = photo("chelsea")
    cat.save(root / "train/cat/a.jpg", quality=90)
    cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "train/cat/b.png")
    photo("chelsea", (48, 64)).save(root / "train/cat/sub/c.jpeg")
    photo("coffee").save(root / "train/coffee/a.png")
    photo("coffee").convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(root / "train/coffee/b.gif")
    photo("rocket").save(root / "train/rocket/a.JPEG")
    photo("astronaut").save(root / "val/cat/a.jpg")
    photo("rocket", (50, 50)).save(root / "val/rocket/a.png")
    good = (root / "train/cat/a.jpg").read_bytes()
    (root / "train/cat/truncated.jpg").write_bytes(good[:len(good) // 2])
    (root / "train/cat/notes.jpg").write_text("not an image\n")
    (root / "train/cat/empty.png").write_bytes(b"")
    photo("astronaut").save(root / "train/cat/.hidden.jpg")
    (root / "train/cat/readme.txt").write_text("ignored\n")
    return root


PREP = Preprocessing.for_input_size(40)  # ImageNet statistics, resize 46, crop 40
BAD = {"train/cat/empty.png": "UnidentifiedImageError", "train/cat/notes.jpg": "UnidentifiedImageError",
       "train/cat/truncated.jpg": "truncated"}


def test_imagefolder_lists_classes_and_files(folder):
    split = load_imagefolder(folder, PREP)
    assert isinstance(split, FolderSplit) and split.preprocessing == PREP
    assert split.labels == ("cat", "coffee", "rocket")
    rel = [os.path.relpath(split.train.path(i), folder) for i in range(len(split.train))]
    assert rel == ["train/cat/a.jpg", "train/cat/b.png", "train/cat/empty.png", "train/cat/notes.jpg",
                   "train/cat/sub/c.jpeg", "train/cat/truncated.jpg", "train/coffee/a.png", "train/coffee/b.gif",
                   "train/rocket/a.JPEG"]
    assert split.train.targets.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2]
    assert split.val.targets.tolist() == [0, 2]  # indices of the train classes; coffee is absent from val
    assert split.val.classes == split.labels


def test_dataloader_workers_skip_and_report_bad_images(folder):
    split = load_imagefolder(folder, PREP)
    loader = torch.utils.data.DataLoader(split.train, batch_size=4, num_workers=2, collate_fn=collate_skip_bad)
    xs, ys, bad = [], [], []
    for x, y, b in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 40, 40) and len(x) == len(y)
        xs.append(x)
        ys += y.tolist()
        bad += b
    assert ys == [0, 0, 0, 1, 1, 2]  # the six good images, in order
    assert all(isinstance(b, BadSample) for b in bad)
    reasons = {os.path.relpath(b.path, folder): b.reason for b in bad}
    assert set(reasons) == set(BAD)
    for rel, expected in BAD.items():
        assert expected in reasons[rel], (rel, reasons[rel])
    x = torch.cat(xs)
    assert torch.isfinite(x).all()
    mean, std = torch.tensor(PREP.mean).view(3, 1, 1), torch.tensor(PREP.std).view(3, 1, 1)
    pixels = x * std + mean  # back to [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.1


def test_eval_samples_are_exactly_the_serving_pipeline(folder):
    split = load_imagefolder(folder, PREP)
    assert len(split.val) == 2
    for i in range(len(split.val)):
        x, target, bad = split.val[i]
        assert bad is None and target == split.val.targets[i]
        with Image.open(split.val.path(i)) as img:
            u8 = torch.from_numpy(image_to_uint8(img, PREP)).float()
        expected = (u8 / 255 - torch.tensor(PREP.mean).view(3, 1, 1)) / torch.tensor(PREP.std).view(3, 1, 1)
        assert x.shape == (3, 40, 40) and torch.equal(x, expected)
    # spawn/forkserver DataLoader workers receive the dataset pickled
    copy = pickle.loads(pickle.dumps(split.val))
    assert len(copy) == 2 and copy.path(1) == split.val.path(1) and torch.equal(copy[1][0], split.val[1][0])


def test_training_augmentation_is_random_and_seeded(folder):
    split = load_imagefolder(folder, PREP)
    torch.manual_seed(1)
    a = split.train[0][0]
    torch.manual_seed(1)
    b = split.train[0][0]
    c = split.train[0][0]
    assert a.shape == (3, 40, 40) and torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("limit", [1000, 2000])  # 64x48 = 3072 pixels: > 2x limit raises, > 1x limit warns
def test_decompression_bombs_are_bad_samples(folder, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    split = load_imagefolder(folder, PREP)
    x, target, bad = split.val[0]
    assert bad is not None and "DecompressionBomb" in bad.reason and bad.path == split.val.path(0)
    assert x.shape == (3, 40, 40) and target == 0


def test_file_gone_after_listing_is_a_bad_sample(folder):
    split = load_imagefolder(folder, PREP)
    os.remove(split.val.path(1))
    assert split.val[0][2] is None
    assert "FileNotFoundError" in split.val[1][2].reason


def test_collate_of_an_all_bad_batch_is_empty():
    bad = [(torch.zeros(3, 8, 8), 1, BadSample("/x.jpg", "OSError: broken"))]
    x, y, reported = collate_skip_bad(bad)
    assert x.shape == (0, 3, 8, 8) and y.shape == (0,) and y.dtype == torch.int64 and reported == [bad[0][2]]


def test_corrupt_image_error_names_the_path_and_reason():
    e = CorruptImageError(*BadSample("/data/train/cat/x.jpg", "OSError: image file is truncated"))
    assert isinstance(e, ValueError) and e.path == "/data/train/cat/x.jpg"
    assert str(e) == "corrupt or unreadable image /data/train/cat/x.jpg: OSError: image file is truncated"


def test_strict_refuses_non_image_files(folder):
    with pytest.raises(DatasetFormatError, match=r"cat/readme\.txt"):
        load_imagefolder(folder, PREP, strict=True)
    (folder / "train/cat/readme.txt").unlink()
    assert len(load_imagefolder(folder, PREP, strict=True).train) == 9


def test_val_class_unknown_to_train(folder):
    (folder / "val/dog").mkdir()
    photo("chelsea").save(folder / "val/dog/a.jpg")
    with pytest.raises(ValueError, match="lacks: dog"):
        load_imagefolder(folder, PREP)


@pytest.mark.parametrize("damage", ["no_val", "no_train", "empty_class", "no_classes"])
def test_imagefolder_layout_errors(folder, damage):
    import shutil

    if damage == "no_val":
        shutil.rmtree(folder / "val")
        looked = folder / "val"
    elif damage == "no_train":
        shutil.rmtree(folder / "train")
        looked = folder / "train"
    elif damage == "empty_class":
        (folder / "train/dog").mkdir()
        (folder / "train/dog/.DS_Store").write_bytes(b"\0")
        looked = folder / "train/dog"
    else:
        shutil.rmtree(folder / "val")
        (folder / "val").mkdir()
        looked = folder / "val"
    with pytest.raises(DatasetNotFoundError) as e:
        load_imagefolder(folder, PREP)
    assert str(looked) in str(e.value) and "DATA_DIR/train/<class>/<image>" in str(e.value)


# ---------------------------------------------------------------------------------------------------- registry

def test_build_dataset_dispatch(tmp_path, folder):
    assert DATASETS == ("digits", "cifar10", "cifar100", "imagefolder", "same-different")
    digits = build_dataset("digits", data_dir=None, input_size=12)
    assert isinstance(digits, DataSplit) and digits.preprocessing.input_size == 12
    write_cifar10(tmp_path)
    assert build_dataset("cifar10", data_dir=tmp_path, input_size=32).preprocessing == \
        Preprocessing(32, 32, CIFAR10_MEAN, CIFAR10_STD, "bilinear")
    big = build_dataset("cifar10", data_dir=tmp_path, input_size=64)
    assert big.preprocessing == Preprocessing(64, 64, CIFAR10_MEAN, CIFAR10_STD, "bilinear")
    assert big.train.images.shape[1:] == (3, 32, 32)  # resized by the trainer, not here
    images = build_dataset("imagefolder", data_dir=folder, input_size=40)
    assert isinstance(images, FolderSplit) and images.preprocessing == PREP
    with pytest.raises(DatasetFormatError):
        build_dataset("imagefolder", data_dir=folder, input_size=40, strict=True)
    relational = build_dataset("same-different", data_dir=None, input_size=32)  # generated: no folder needed
    assert relational.labels == ("different", "same") and relational.train.images.shape[1:] == (3, 32, 32)


def test_build_dataset_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'imagenet'; valid names: digits, cifar10, cifar100, "
                                         "imagefolder"):
        build_dataset("imagenet", data_dir=tmp_path, input_size=224)
    with pytest.raises(ValueError, match="needs a data folder"):
        build_dataset("cifar10", data_dir=None, input_size=32)
    with pytest.raises(ValueError, match="--download fetches cifar10 and cifar100 only"):
        build_dataset("imagefolder", data_dir=tmp_path, input_size=224, download=True)
