"""The preprocessing definition that travels with a checkpoint. Imports neither torch nor torchvision.

Training (evaluation transforms), export (the in-graph normalisation, calibration data) and serving all build
their pipelines from this one object, read from the checkpoint's metadata.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Pillow, NumPy and torch are imported where they are used, so the core stays light.
    import numpy as np
    import torch
    from PIL import Image

__all__ = ["Preprocessing", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR_MEAN", "CIFAR_STD", "CIFAR10_MEAN",
           "CIFAR10_STD", "to_rgb", "crop_box", "resize_and_crop", "image_to_uint8", "normalize", "normalize_uint8",
           "normalize_constants"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)  # CIFAR-100 training set
CIFAR_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 training set
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the network's input.

    Resize the shorter side to ``resize_size`` (``interpolation``), center-crop ``input_size`` x ``input_size``,
    scale to [0, 1], then ``(x - mean) / std`` per channel. The tensor is (3, input_size, input_size), RGB.
    """

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop: str = "center"

    def __post_init__(self) -> None:
        # Coerce JSON lists back to tuples so that a round trip through metadata compares equal.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        if not isinstance(self.input_size, int) or self.input_size < 1:
            problems.append(f"input_size must be a positive integer, got {self.input_size!r}")
        if not isinstance(self.resize_size, int) or self.resize_size < self.input_size:
            problems.append(f"resize_size must be an integer >= input_size, got {self.resize_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append(f"mean and std need 3 values (RGB), got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            problems.append(f"std values must be > 0, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop != "center":
            problems.append(f"crop must be 'center', got {self.crop!r}")
        if problems:
            raise ValueError("invalid preprocessing: " + "; ".join(problems))

    @classmethod
    def for_input_size(cls, input_size: int) -> Preprocessing:
        """The standard definition: CIFAR statistics at 32x32 (no resize), ImageNet's 256 -> 224 otherwise."""
        if input_size <= 32:
            return cls(input_size, input_size, CIFAR_MEAN, CIFAR_STD)
        return cls(input_size, round(input_size * 256 / 224), IMAGENET_MEAN, IMAGENET_STD)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {"input_size", "resize_size", "mean", "std", "interpolation", "crop"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"invalid preprocessing: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        missing = {"input_size", "resize_size", "mean", "std"} - set(d)
        if missing:
            raise ValueError(f"invalid preprocessing: missing fields {sorted(missing)}")
        return cls(**d)


_CHUNK = 1 << 20  # pixels per step of the 16-bit conversion: 8 MB of float64 at a time

_PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image as 8-bit RGB: EXIF orientation applied, alpha composited on white, palette, grey,
    16-bit grey and CMYK converted."""
    from PIL import ExifTags, ImageOps

    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        # Only then: without a rotation exif_transpose returns a copy (a single-threaded 640x427 decode: 3.5 -> 2.3 ms
        # without it, mostly the copy's page faults).
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow's convert("L") clips 16-bit values at 255; scale the full range down instead.
        import numpy as np
        from PIL import Image

        a = np.asarray(img)  # its own dtype; converted a chunk at a time, never as a float64 copy of the whole image
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        out = np.empty(a.shape, np.uint8)
        src, dst = a.reshape(-1), out.reshape(-1)  # flat: any aspect ratio, a 1x50,000,000 image too
        for i in range(0, src.size, _CHUNK):
            dst[i:i + _CHUNK] = np.clip(src[i:i + _CHUNK].astype(np.float64) * (255.0 / peak) + 0.5, 0, 255
                                        ).astype(np.uint8)
        img = Image.fromarray(out, "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        from PIL import Image

        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # alpha_composite copies: no need to here
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def crop_box(size: tuple[int, int], prep: Preprocessing) -> tuple[tuple[float, float, float, float], bool]:
    """Where the network's input comes from in an image of ``size`` (w, h): the source box (left, top, right,
    bottom) that resizing the shorter side to ``prep.resize_size`` and center-cropping ``prep.input_size`` maps onto
    the crop, and whether it needs resampling (False: the box is an integer crop of the image as it is)."""
    w, h = size
    scale = prep.resize_size / min(w, h)
    resized = (max(prep.resize_size, round(w * scale)), max(prep.resize_size, round(h * scale)))
    left, top = (resized[0] - prep.input_size) // 2, (resized[1] - prep.input_size) // 2
    if resized == (w, h):
        return (left, top, left + prep.input_size, top + prep.input_size), False
    sx, sy = resized[0] / w, resized[1] / h  # resized pixels per source pixel
    return (left / sx, top / sy, (left + prep.input_size) / sx, (top + prep.input_size) / sy), True


def resize_and_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``prep.resize_size``, then center-crop ``prep.input_size`` square (PIL, RGB).

    Only the crop is resampled (``resize(box=...)``, the crop's footprint in the source): the same filter at the
    same sample positions as resizing the whole image and cropping, half the work for a 640x427 photo at 224
    (about 1.0 instead of 1.9 ms). Float rounding of the positions moves ~3% of the values by 1/255 at most.
    """
    box, resample = crop_box(img.size, prep)
    if not resample:
        return img.crop(tuple(int(v) for v in box))
    return img.resize((prep.input_size, prep.input_size), resample=_PIL_FILTERS[prep.interpolation], box=box)


def image_to_uint8(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A decoded image as the network's uint8 input: (3, S, S) RGB, before the mean/std normalisation.

    This is the one geometric pipeline shared by image-folder evaluation, export parity and serving; the
    normalisation ``(x / 255 - mean) / std`` follows, in the exported graph or in PyTorch.
    """
    import numpy as np

    rgb = resize_and_crop(to_rgb(img), prep)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)


def normalize_constants(prep: Preprocessing, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` as (3, 1, 1) tensors of ``like``'s float dtype and device: made once ahead of a CUDA graph
    capture, which cannot copy them from the host while it records."""
    if not like.is_floating_point():
        raise ValueError(f"normalize_constants: `like` must be a float tensor, got {like.dtype}")
    return like.new_tensor(prep.mean).view(3, 1, 1), like.new_tensor(prep.std).view(3, 1, 1)


def normalize(x01: torch.Tensor, prep: Preprocessing,
              constants: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(x - mean) / std`` per channel for a float tensor (..., 3, H, W) of values in [0, 1], on its device
    (``constants``: ``normalize_constants(prep, x01)`` made earlier). (No torch import here: only the tensor's own
    methods.)"""
    mean, std = constants if constants is not None else normalize_constants(prep, x01)
    return (x01 - mean) / std


def normalize_uint8(images: torch.Tensor, prep: Preprocessing,
                    constants: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(x / 255 - mean) / std``: a uint8 tensor (..., 3, H, W) from ``image_to_uint8`` -> float32 on its device.
    The PyTorch side of the normalisation exported graphs carry."""
    return normalize(images.float().div(255), prep, constants)
