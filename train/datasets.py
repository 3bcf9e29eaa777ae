"""The data sets ``ganet-train`` reads, by name: :func:`build_dataset` ("digits", "cifar10", "cifar100", "imagefolder",
"same-different").

* "same-different" is generated in memory (:mod:`ganet.train.same_different`): two glyphs far apart, same or not.

* CIFAR-10/100 load into memory (a :class:`~ganet.train.data.DataSplit` of uint8 tensors) from torchvision's on-disk
  format, ``DATA_DIR/cifar-10-batches-py/`` or ``DATA_DIR/cifar-100-python/``, without torchvision: the pickles go
  through an unpickler that accepts nothing but NumPy arrays, so a foreign file cannot run code. torchvision only
  downloads (``download=True``), which checks the archive's MD5.
* An image folder, ``DATA_DIR/{train,val}/<class>/<image>``, streams from disk through an :class:`ImageFolderDataset`.
  A corrupt image never raises inside a DataLoader worker: its sample comes back marked bad, and
  :func:`collate_skip_bad` drops it and hands its path and the decoder's reason to the main process, which counts
  them, or raises :class:`CorruptImageError` when the run is strict.

Evaluation of an image folder uses :func:`ganet.preprocess.image_to_uint8`, the pipeline export and serving use.
"""
from __future__ import annotations

import codecs
import os
import pickle
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ganet.preprocess import (CIFAR10_MEAN, CIFAR10_STD, CIFAR_MEAN, CIFAR_STD, Preprocessing, image_to_uint8,
                              normalize_uint8, to_rgb)
from ganet.train.data import DataSplit, ImageTensors, load_digits
from ganet.train.same_different import load_same_different

__all__ = ["DATASETS", "IMAGE_EXTENSIONS", "DatasetNotFoundError", "DatasetFormatError", "CorruptImageError",
           "BadSample", "FolderSplit", "ImageFolderDataset", "build_dataset", "load_cifar", "load_imagefolder",
           "collate_skip_bad", "dataset_location_problem", "load_same_different"]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "same-different")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where they should be; the message says where it looked and how to get them."""


class DatasetFormatError(ValueError):
    """A data set file exists but is not what it should be (foreign, truncated or corrupt)."""


class CorruptImageError(ValueError):
    """An image of an image folder could not be decoded; raised by a strict run (the dataset itself never raises)."""

    def __init__(self, path: str, reason: str = "could not be decoded") -> None:
        super().__init__(f"corrupt or unreadable image {path}: {reason}")
        self.path, self.reason = path, reason


def build_dataset(data: str, *, data_dir: str | Path | None, input_size: int, download: bool = False,
                  strict: bool = False) -> DataSplit | FolderSplit:
    """The data set ``data`` (one of :data:`DATASETS`) with the preprocessing its checkpoint will carry.

    CIFAR keeps its own mean/std; at ``input_size != 32`` the 32x32 images are resized by the trainer's
    ``preprocess_batch``. Image folders use ``Preprocessing.for_input_size(input_size)``.
    """
    if data not in DATASETS:
        raise ValueError(f"unknown data set {data!r}; valid names: {', '.join(DATASETS)}")
    if data == "digits":
        return load_digits(input_size)
    if data == "same-different":
        return load_same_different(input_size)
    if data_dir is None:
        raise ValueError(f"data set {data!r} needs a data folder (--data-dir)")
    if data in _CIFAR:
        split = load_cifar(data, data_dir, download=download)
        if input_size != 32:
            spec = _CIFAR[data]
            split = replace(split, preprocessing=Preprocessing(input_size, input_size, spec.mean, spec.std))
        return split
    if download:
        raise ValueError("--download fetches cifar10 and cifar100 only; an image folder must already be on disk")
    return load_imagefolder(data_dir, Preprocessing.for_input_size(input_size), strict=strict)


# ---------------------------------------------------------------------------------------------------------- CIFAR

@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str  # the folder inside DATA_DIR, as torchvision extracts it
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: str
    names_key: str
    num_classes: int
    archive_mib: int  # size of torchvision's download
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str


_CIFAR = {
    "cifar10": _CifarSpec("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                          ("test_batch",), "batches.meta", "labels", "label_names", 10, 163, CIFAR10_MEAN,
                          CIFAR10_STD, "CIFAR10"),
    "cifar100": _CifarSpec("CIFAR-100", "cifar-100-python", ("train",), ("test",), "meta", "fine_labels",
                           "fine_label_names", 100, 161, CIFAR_MEAN, CIFAR_STD, "CIFAR100"),
}
_ROW = 3 * 32 * 32  # one image per row: the R plane, then G, then B, each 32x32 row-major


def load_cifar(name: str, data_dir: str | Path, download: bool = False) -> DataSplit:
    """CIFAR-10 or CIFAR-100 from torchvision's files in ``data_dir``: train = the 50,000 training images, val = the
    10,000 test images, (N, 3, 32, 32) uint8 RGB; labels = the meta file's class names."""
    if name not in _CIFAR:
        raise ValueError(f"unknown CIFAR data set {name!r}; valid names: {', '.join(_CIFAR)}")
    spec, root = _CIFAR[name], Path(data_dir).expanduser()
    if download:
        _download(spec, root)
    folder = root / spec.folder
    problem = _cifar_missing(spec, root)
    if problem:
        raise DatasetNotFoundError(problem)
    names = _read_class_names(folder / spec.meta_file, spec)
    return DataSplit(train=_read_batches(folder, spec.train_files, spec),
                     val=_read_batches(folder, spec.test_files, spec),
                     labels=names, preprocessing=Preprocessing(32, 32, spec.mean, spec.std, "bilinear"))


def _cifar_missing(spec: _CifarSpec, root: Path) -> str | None:
    """What is missing of a CIFAR folder in ``root``, said for the user; None when every file is there."""
    folder = root / spec.folder
    expected = (*spec.train_files, *spec.test_files, spec.meta_file)
    missing = [f for f in expected if not (folder / f).is_file()]
    if not missing:
        return None
    where = f"{folder} does not exist" if not folder.is_dir() else f"missing: {', '.join(missing)}"
    return (f"{spec.title} not found: looked for {folder}/{{{', '.join(expected)}}} ({where}). Pass --download to "
            f"fetch it ({spec.archive_mib} MiB) into {root}, or place torchvision's {spec.folder} folder there.")


def dataset_location_problem(data: str, data_dir: str | Path | None, download: bool = False) -> str | None:
    """Why data set ``data`` cannot be found in ``data_dir`` (None when it can, or when nothing is on disk to find):
    a check of folders and files only, so that a config is judged as a whole before anything is loaded."""
    if data in _CIFAR:
        return None if download or data_dir is None else _cifar_missing(_CIFAR[data], Path(data_dir).expanduser())
    if data == "imagefolder" and data_dir is not None:
        root = Path(data_dir).expanduser()
        for split_dir in (root / "train", root / "val"):
            if not split_dir.is_dir():
                return f"image folder data set: {split_dir} is not a folder (expected DATA_DIR/train/<class>/<image> " \
                       "and DATA_DIR/val/<class>/<image>)"
    return None


def _download(spec: _CifarSpec, root: Path) -> None:
    try:
        from torchvision import datasets
    except ImportError as e:
        raise ImportError("downloading CIFAR needs torchvision: pip install 'ganet[train]'") from e
    try:  # downloads and extracts the whole archive once (train and test), checking its MD5 and the files'
        getattr(datasets, spec.torchvision_class)(root=str(root), train=True, download=True)
    except Exception as e:  # network errors, a failed checksum: say which data set and where
        raise DatasetNotFoundError(f"downloading {spec.title} into {root} failed: {type(e).__name__}: {e}") from e


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: how NumPy 1.x/2.x (and Python 2) pickle an ndarray."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct, protocols 0-4
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._)core.numeric._frombuffer, protocol 5
    scalar = np.float64(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}  # Python 3 writes bytes at protocol 2 as _codecs.encode
    for core in ("numpy.core", "numpy._core"):
        allowed |= {(f"{core}.multiarray", "_reconstruct"): reconstruct, (f"{core}.multiarray", "scalar"): scalar,
                    (f"{core}.numeric", "_frombuffer"): frombuffer}
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only NumPy arrays are allowed)") from None


def _read_pickle(path: Path, spec: _CifarSpec, expected: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # latin1, as torchvision: Python 2 str keys become str, array bytes stay bytes-exact.
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except OSError:
        raise
    except Exception as e:  # garbage makes pickle raise almost anything (UnpicklingError, EOFError, KeyError, ...)
        raise DatasetFormatError(f"{path} is not a readable {spec.title} file ({type(e).__name__}: {e}); "
                                 f"expected {expected}") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path} holds a {type(obj).__name__}, not a {spec.title} dict; expected {expected}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batches(folder: Path, files: Sequence[str], spec: _CifarSpec) -> ImageTensors:
    expected = (f"a pickled dict with 'data' (N, {_ROW}) uint8 and '{spec.labels_key}' (N integers in "
                f"[0, {spec.num_classes}))")
    images, targets = [], []
    for name in files:
        path = folder / name
        entry = _read_pickle(path, spec, expected)
        data, labels = entry.get("data"), entry.get(spec.labels_key)
        if labels is None or data is None:
            raise DatasetFormatError(f"{path} has keys {sorted(map(str, entry))}; expected {expected}")
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _ROW):
            found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DatasetFormatError(f"{path}: 'data' is a {found}; expected {expected}")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
            raise DatasetFormatError(f"{path}: '{spec.labels_key}' has dtype {labels.dtype} and shape {labels.shape} "
                                     f"for {len(data)} images; expected {expected}")
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise DatasetFormatError(f"{path}: labels span [{labels.min()}, {labels.max()}]; expected {expected}")
        images.append(data)
        targets.append(labels.astype(np.int64))
    data = np.concatenate(images).reshape(-1, 3, 32, 32)  # a fresh, writable copy: (N, 3072) -> (N, 3, 32, 32)
    return ImageTensors(torch.from_numpy(data), torch.from_numpy(np.concatenate(targets)))


def _read_class_names(path: Path, spec: _CifarSpec) -> tuple[str, ...]:
    expected = f"a pickled dict with '{spec.names_key}': {spec.num_classes} class names"
    names = _read_pickle(path, spec, expected).get(spec.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes \
            or not all(isinstance(n, (str, bytes)) for n in names):
        raise DatasetFormatError(f"{path}: '{spec.names_key}' is {type(names).__name__}"
                                 f"{f' of length {len(names)}' if hasattr(names, '__len__') else ''}; "
                                 f"expected {expected}")
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


# --------------------------------------------------------------------------------------------------- image folders

class BadSample(NamedTuple):
    """An image that could not be decoded: its path and the decoder's reason."""
    path: str
    reason: str


Sample = tuple[torch.Tensor, int, "BadSample | None"]  # (x (3, S, S) float32, target, None or why x is a dummy)

_LAYOUT = ("expected layout:\n"
           "  DATA_DIR/train/<class>/<image>   one folder per class; images " + " ".join(IMAGE_EXTENSIONS) + "\n"
           "  DATA_DIR/val/<class>/<image>     the same class names (a class may be absent from val)")


@dataclass
class FolderSplit:
    train: ImageFolderDataset
    val: ImageFolderDataset
    labels: tuple[str, ...]  # sorted class folder names of train/; the class index is the position here
    preprocessing: Preprocessing


class _PathTable:
    """Many relative paths in two NumPy arrays rather than a list of str: DataLoader workers fork the dataset, and
    reading millions of Python objects touches their reference counts, which copies their pages into every worker
    (pytorch/pytorch#13246)."""

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)  # (N + 1,)
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())


class ImageFolderDataset(Dataset):
    """Images listed from a class-per-folder tree, decoded on demand.

    ``sample = dataset[i]`` is ``(x, target, bad)``: x (3, S, S) float32 normalised with ``prep``; bad is None, or a
    :class:`BadSample` when the file could not be read or decoded (x is then zeros). Training samples get
    RandomResizedCrop(S, scale=(0.08, 1)) and a random horizontal flip; evaluation samples are exactly
    ``normalize_uint8(image_to_uint8(image, prep))``.
    """

    def __init__(self, root: str | Path, files: Sequence[str], targets: Sequence[int], classes: Sequence[str],
                 prep: Preprocessing, train: bool) -> None:
        if len(files) != len(targets):
            raise ValueError(f"{len(files)} files but {len(targets)} targets")
        self.root, self.classes, self.prep, self.train = str(root), tuple(classes), prep, train
        self._files = _PathTable(files)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))  # (N,)
        self._augment = _train_transform(prep) if train else None

    def __len__(self) -> int:
        return len(self._files)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self._files[i])

    def __getitem__(self, i: int) -> Sample:
        path, target, s = self.path(i), int(self.targets[i]), self.prep.input_size
        try:
            image = self._decode(path)  # (3, H, W) uint8
        except Exception as e:  # whatever the decoder throws is the file's fault: report it, keep the worker alive
            return torch.zeros(3, s, s), target, BadSample(path, f"{type(e).__name__}: {e}")
        if self._augment is not None:
            return self._augment(image), target, None
        return normalize_uint8(image, self.prep), target, None

    def _decode(self, path: str) -> torch.Tensor:
        from PIL import Image

        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a decompression bomb is a bad sample too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode fully here: Image.open reads only the header
                if self.train:  # the crop and resize come from the augmentation
                    return torch.from_numpy(np.asarray(to_rgb(img), dtype=np.uint8).transpose(2, 0, 1).copy())
                return torch.from_numpy(image_to_uint8(img, self.prep))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.root!r}, {len(self)} images, {len(self.classes)} classes, "
                f"{'train' if self.train else 'eval'})")


def _train_transform(prep: Preprocessing):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(prep.input_size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BILINEAR,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(prep.mean, prep.std),
    ])


def collate_skip_bad(batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
    """DataLoader ``collate_fn``: drop bad samples. -> (x (B', 3, S, S), y (B',) int64, bad samples), B' <= B.

    B' may be 0 when every image of a batch is bad; the trainer skips such a step.
    """
    good = [(x, t) for x, t, bad in batch if bad is None]
    bad = [b for _, _, b in batch if b is not None]
    if good:
        x = torch.stack([x for x, _ in good])
    else:
        x = torch.empty(0, *batch[0][0].shape) if batch else torch.empty(0)
    return x, torch.tensor([t for _, t in good], dtype=torch.int64), bad


def load_imagefolder(data_dir: str | Path, prep: Preprocessing, *, strict: bool = False) -> FolderSplit:
    """``data_dir/train`` and ``data_dir/val`` as datasets; class index = position among the sorted train class
    folders. Hidden files and folders are ignored; files are listed sorted by path (subfolders included).

    Files without an image extension are skipped, or with ``strict`` raise :class:`DatasetFormatError`. Corrupt
    image contents are found when read (see :func:`collate_skip_bad`).
    """
    root = Path(data_dir).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise DatasetNotFoundError(f"image folder data set: {split_dir} is not a folder\n{_LAYOUT}")
    classes = _class_folders(train_dir)
    val_classes = _class_folders(val_dir)
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise ValueError(f"{val_dir} has class folders that {train_dir} lacks: {', '.join(unknown[:10])}"
                         f"{f' (and {len(unknown) - 10} more)' if len(unknown) > 10 else ''}; the class index is the "
                         f"position among the train class folders, so every val class must be one of them")
    train = _scan(train_dir, classes, classes, prep, train=True, strict=strict)
    val = _scan(val_dir, val_classes, classes, prep, train=False, strict=strict)
    return FolderSplit(train=train, val=val, labels=tuple(classes), preprocessing=prep)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_folders(split_dir: Path) -> list[str]:
    with os.scandir(split_dir) as it:
        classes = sorted(e.name for e in it if _visible(e.name) and e.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} has no class folders\n{_LAYOUT}")
    return classes


def _scan(split_dir: Path, class_names: Sequence[str], all_classes: Sequence[str], prep: Preprocessing,
          train: bool, strict: bool) -> ImageFolderDataset:
    index = {name: i for i, name in enumerate(all_classes)}
    files: list[str] = []
    targets: list[int] = []
    others: list[str] = []
    for name in class_names:
        found = []
        for folder, dirs, names in os.walk(split_dir / name):
            dirs[:] = sorted(d for d in dirs if _visible(d))  # walk order is sorted, hidden folders skipped
            rel = os.path.relpath(folder, split_dir)
            for f in sorted(filter(_visible, names)):
                (found if f.lower().endswith(IMAGE_EXTENSIONS) else others).append(os.path.join(rel, f))
        found.sort()  # by path, so a subfolder's files sit where its name sorts
        if not found:
            raise DatasetNotFoundError(f"class folder {split_dir / name} holds no images\n{_LAYOUT}")
        files += found
        targets += [index[name]] * len(found)
    if strict and others:
        raise DatasetFormatError(f"{len(others)} files in {split_dir} are not images ({', '.join(others[:5])}"
                                 f"{', ...' if len(others) > 5 else ''}); image extensions: "
                                 f"{' '.join(IMAGE_EXTENSIONS)} (without --strict they are skipped)")
    return ImageFolderDataset(split_dir, files, targets, all_classes, prep, train)
