"""The real images ``ganet-export`` checks and calibrates on: the bundled photographs always, and the checkpoint's own
data set wherever this machine can reach it.

``ganet-train`` records the data set in the checkpoint (``extra["data"]`` and, for data on disk,
``extra["data_dir"]``); ``--data-dir`` points elsewhere (a copy on the exporting host, or a checkpoint from before the
folder was recorded). When the data set is reachable, its held-out split (an evenly spaced subset of at most
``--heldout-images``) joins the photographs in every parity check and gates ``--int8`` (top-1 may drop at most one
point), and INT8 is calibrated on its training split. When it is not, parity runs on the photographs alone, INT8 is
calibrated on them and reported without a gate, and the export says so in one line.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ganet.preprocess import Preprocessing, image_to_uint8

if TYPE_CHECKING:  # NumPy and the parity module (and its imports) load where used: ganet-export --help stays fast
    import numpy as np

    from ganet.export.parity import ParityInputs

__all__ = ["DEFAULT_HELDOUT_IMAGES", "DataUnavailableError", "ExportData", "recorded_dataset", "resolve_export_data"]

DEFAULT_HELDOUT_IMAGES = 1000
_ON_DISK = ("cifar10", "cifar100", "imagefolder")


class DataUnavailableError(ValueError):
    """A data folder asked for explicitly cannot be used (missing, another data set's classes)."""


@dataclass
class ExportData:
    """The checkpoint's data set as far as this machine reaches it."""

    prep: Preprocessing
    name: str | None = None  # the data set the held-out images come from; None: photographs only
    data_dir: str | None = None
    heldout: ParityInputs | None = None  # labelled held-out images (targets set)
    heldout_limit: int = DEFAULT_HELDOUT_IMAGES
    note: str = ""  # one line: what the export checks on, or why the data set is out of reach
    _split: Any = field(default=None, repr=False)  # the loaded data set, for calibration

    @property
    def reachable(self) -> bool:
        return self.heldout is not None

    def parity_inputs(self) -> ParityInputs:
        """The photographs, then the held-out images (without their labels)."""
        import numpy as np

        from ganet.export.parity import ParityInputs, photographs

        photos = photographs(self.prep)
        if self.heldout is None:
            return photos
        return ParityInputs(np.concatenate([photos.images, self.heldout.images]), photos.names + self.heldout.names)

    def calibration(self, count: int) -> tuple[np.ndarray, str]:
        """(uint8 images (N, 3, S, S), what they are): the training split where reachable, else the photographs."""
        from ganet.export.parity import digits_images, photographs

        if self.name == "digits":
            calib = digits_images(self.prep, "train", limit=count)
            return calib.images, f"digits training split, first {len(calib)} images"
        if self._split is not None:
            calib = _split_images(self._split.train, self.prep, count, f"{self.name}-train")
            return calib.images, f"{self.name} training split in {self.data_dir}, {len(calib)} evenly spaced images"
        photos = photographs(self.prep)  # no training images this machine can load
        return photos.images, f"{len(photos)} bundled photographs (the checkpoint's data set is not reachable here)"

    def record(self) -> dict[str, Any]:
        """What the manifest keeps, so that --verify rebuilds the same inputs."""
        return {"dataset_heldout": self.name if self.reachable else None,
                "data_dir": self.data_dir if self.reachable else None,
                "heldout_images": len(self.heldout) if self.heldout is not None else 0,
                "heldout_limit": self.heldout_limit}


def recorded_dataset(extra: dict[str, Any], prep: Preprocessing) -> str | None:
    """The data set a checkpoint says it was trained on: ``extra["data"]``, or the digits by their statistics."""
    from ganet.train.data import DIGITS_MEAN, DIGITS_STD

    name = extra.get("data") or extra.get("dataset")
    if name is None and prep.mean == DIGITS_MEAN and prep.std == DIGITS_STD:
        name = "digits"
    return name if isinstance(name, str) else None


def resolve_export_data(extra: dict[str, Any], prep: Preprocessing, labels: tuple[str, ...],
                        data_dir: str | Path | None = None,
                        heldout_limit: int = DEFAULT_HELDOUT_IMAGES) -> ExportData:
    """Find the checkpoint's data set. ``data_dir`` (``--data-dir``) overrides the recorded folder and must work:
    :class:`DataUnavailableError` otherwise. A recorded folder that is gone only falls back, with a note."""
    from ganet.export.parity import digits_images

    name = recorded_dataset(extra, prep)
    given = data_dir is not None
    out = ExportData(prep, heldout_limit=heldout_limit)

    def unreachable(why: str) -> ExportData:
        if given:
            raise DataUnavailableError(f"{data_dir}: {why}")
        out.note = (f"the checkpoint's data set is not reachable here ({why}): parity runs on the bundled "
                    "photographs only, and --int8 is calibrated on them and not gated")
        return out

    if name == "digits":
        if given:
            raise DataUnavailableError(f"{data_dir}: the checkpoint's data set is the digits bundled with "
                                       "scikit-learn, which need no folder")
        out.name, out.heldout = name, _subset(digits_images(prep, "val"), heldout_limit)
        out.note = f"held-out split of the digits: {len(out.heldout)} images"
        return out
    if name not in _ON_DISK:
        return unreachable("it records no data set ganet can load" if name is None else
                           f"ganet cannot load its data set {name!r}")
    folder = data_dir if given else extra.get("data_dir")
    if not isinstance(folder, str | Path):
        return unreachable(f"it records no folder for its {name} data; pass --data-dir")
    from ganet.train.datasets import dataset_location_problem, load_cifar, load_imagefolder

    folder = str(Path(folder).expanduser().resolve())
    problem = dataset_location_problem(name, folder)
    if problem:
        return unreachable(problem)
    try:
        split = load_imagefolder(folder, prep) if name == "imagefolder" else load_cifar(name, folder)
    except (OSError, ValueError) as e:  # DatasetNotFoundError is an OSError, DatasetFormatError a ValueError
        return unreachable(str(e).splitlines()[0])
    if tuple(split.labels) != tuple(labels):
        return unreachable(f"its classes ({', '.join(split.labels[:4])}{', ...' if len(split.labels) > 4 else ''}) "
                           f"are not the checkpoint's labels ({', '.join(labels[:4])}"
                           f"{', ...' if len(labels) > 4 else ''})")
    try:
        heldout = _split_images(split.val, prep, heldout_limit, f"{name}-val")
    except ValueError as e:
        return unreachable(str(e))
    out.name, out.data_dir, out._split, out.heldout = name, folder, split, heldout
    out.note = (f"held-out split of {name} in {folder}: {len(heldout)} of {len(split.val)} images"
                + (" (evenly spaced)" if len(heldout) < len(split.val) else ""))
    return out


def _spaced(n: int, limit: int) -> np.ndarray:
    """At most ``limit`` indices spread evenly over ``range(n)`` (a sorted folder's classes all take part)."""
    import numpy as np

    if limit <= 0 or n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def _subset(inputs: ParityInputs, limit: int) -> ParityInputs:
    from ganet.export.parity import ParityInputs

    idx = _spaced(len(inputs), limit)
    if len(idx) == len(inputs):
        return inputs
    return ParityInputs(inputs.images[idx], [inputs.names[i] for i in idx], inputs.targets[idx])


def _split_images(part: Any, prep: Preprocessing, limit: int, label: str) -> ParityInputs:
    """Labelled uint8 images of a data set split through ``image_to_uint8`` (what serving feeds the model):
    in-memory tensors (CIFAR) or an image folder's files; undecodable files are left out."""
    import numpy as np
    from PIL import Image

    from ganet.export.parity import ParityInputs

    images, names, targets = [], [], []
    for i in _spaced(len(part), limit).tolist():
        if hasattr(part, "path"):  # an ImageFolderDataset
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(part.path(i)) as img:
                        images.append(image_to_uint8(img, prep))
            except Exception:  # a corrupt file is the data's fault, as in training: skip it
                continue
            names.append(f"{label}:{Path(part.path(i)).relative_to(part.root).as_posix()}")
        else:  # ImageTensors, (N, 3, H, W) uint8
            images.append(image_to_uint8(Image.fromarray(part.images[i].permute(1, 2, 0).numpy()), prep))
            names.append(f"{label}:{i}")
        targets.append(int(part.targets[i]))
    if not images:
        raise ValueError(f"no image of {label} could be decoded")
    return ParityInputs(np.stack(images), names, np.asarray(targets, dtype=np.int64))
