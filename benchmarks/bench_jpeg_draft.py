"""JPEG DCT-domain downscaling (Pillow's ``draft``, libjpeg's scaled IDCT) against full decoding, for serving.

ganet-serve (serve/images.py) decodes a large JPEG at 1/2, 1/4 or 1/8 scale when the reduced image keeps at least
DRAFT_MARGIN x the resize target on its shorter side and the image has at least DRAFT_MIN_PIXELS pixels. This
script measures what that costs and buys, at 224x224 (resize 256, ImageNet preprocessing):

  1. decode + resize + crop time of one photo saved as a q90 JPEG at 0.3 to 12 megapixels, full vs draft;
  2. agreement between the network's answers on draft and full decodes over many large JPEGs made from the real
     photographs shipped with scikit-image and scikit-learn: each photo upscaled to several sizes and aspects, and
     mosaics of native-resolution photos (real detail at full size: upscaled photos alone would flatter the DCT
     shortcut). For each margin: top-1 agreement, max and mean |delta logit|, max |delta prob|, mean total
     variation of the softmax, and pixel differences of the (3, 224, 224) input (mean, max |delta|, min PSNR).

There is no ImageNet-trained checkpoint here: by default the network is ga_shufflenet_v2 at random init with its
BatchNorm statistics set from crops of the photographs and its classifier scaled up, so that its answers depend
on the image (top-1 agreement of such a network is a proxy); pass --checkpoint for a trained one (224 input).

    python benchmarks/bench_jpeg_draft.py
    python benchmarks/bench_jpeg_draft.py --checkpoint runs/imagenet/best.safetensors --margins 1 2

Writes benchmarks/results/jpeg_draft.json.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _stats import spread  # benchmarks/_stats.py (scripts run from this folder)

from ganet.export.parity import torch_reference
from ganet.preprocess import Preprocessing, image_to_uint8, normalize
from ganet.serve.images import DRAFT_MARGIN, DRAFT_MIN_PIXELS, jpeg_draft_scale
from ganet.serve.routes_classify import softmax

ROOT = Path(__file__).resolve().parent.parent


def photographs() -> dict[str, Image.Image]:
    """The real photographs scikit-image and scikit-learn ship (RGB; camera is greyscale)."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    out = {name: Image.fromarray(getattr(data, name)()) for name in
           ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
            "camera")}
    out.update({name: Image.fromarray(load_sample_image(f"{name}.jpg")) for name in ("china", "flower")})
    return out


def encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def corpus(photos: dict[str, Image.Image], quality: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Large JPEGs: every photo upscaled (bicubic) to shorter sides 1080..3024 in 4:3, 3:2 and 16:9 (sides multiples
    of 8, as cameras write them), landscape and portrait; and mosaics of 512x512 tiles cut from the photos at
    (near) native resolution, 2048x1536 to 4096x3072."""
    rng = np.random.default_rng(seed)
    out = []
    aspects = (4 / 3, 3 / 2, 16 / 9)
    for i, (name, img) in enumerate(photos.items()):
        for j, short in enumerate((1080, 1536, 2048, 3024)):
            aspect = aspects[(i + j) % 3]
            w, h = img.size
            cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)  # crop to the aspect
            cw, ch = min(cw, w), min(ch, h)
            box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
            long = round(short * aspect / 8) * 8  # camera sizes are multiples of 8
            size = (long, short) if (i + j) % 2 == 0 else (short, long)
            if size[0] < size[1]:  # portrait: rotate the crop first so that nothing is squashed
                crop = img.crop(box).transpose(Image.Transpose.ROTATE_90)
            else:
                crop = img.crop(box)
            out.append((f"{name}-{size[0]}x{size[1]}", encode(crop.resize(size, Image.Resampling.BICUBIC), quality)))
    tiles = []
    for img in photos.values():
        rgb = img.convert("RGB")
        scale = 512 / min(rgb.size)
        rgb = rgb.resize((max(512, round(rgb.width * scale)), max(512, round(rgb.height * scale))),
                         Image.Resampling.BICUBIC) if scale > 1 else rgb
        for _ in range(3):
            x = int(rng.integers(0, rgb.width - 511))
            y = int(rng.integers(0, rgb.height - 511))
            tiles.append(rgb.crop((x, y, x + 512, y + 512)))
    for k, (cols, rows) in enumerate([(4, 3), (4, 3), (6, 4), (6, 4), (8, 6), (5, 4), (6, 4), (4, 3)]):
        mosaic = Image.new("RGB", (cols * 512, rows * 512))
        order = rng.permutation(len(tiles))
        for t in range(cols * rows):
            mosaic.paste(tiles[order[t % len(tiles)]], ((t % cols) * 512, (t // cols) * 512))
        out.append((f"mosaic{k}-{mosaic.width}x{mosaic.height}", encode(mosaic, quality)))
    return out


def decode(data: bytes, prep: Preprocessing, scale: int) -> np.ndarray:
    """image_to_uint8 of the JPEG decoded at 1/scale in the DCT domain (1: full decode): (3, S, S) uint8."""
    img = Image.open(io.BytesIO(data))
    if scale > 1:
        img.draft(img.mode, (img.width // scale, img.height // scale))
    img.load()
    return image_to_uint8(img, prep)


def default_model(photos: dict[str, Image.Image], prep: Preprocessing):
    """Random-init ga_shufflenet_v2 whose answers depend on the image: BatchNorm statistics from crops of the
    photographs (one pass, cumulative average), classifier scaled by 20."""
    import torch

    from ganet.models import create_model

    torch.manual_seed(0)
    model = create_model("ga_shufflenet_v2")
    g = torch.Generator().manual_seed(0)
    crops = []
    for img in photos.values():
        t = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255  # (3, H, W)
        for _ in range(6):
            s = int(torch.randint(128, min(t.shape[1:]) + 1, (1,), generator=g))
            y = int(torch.randint(0, t.shape[1] - s + 1, (1,), generator=g))
            x = int(torch.randint(0, t.shape[2] - s + 1, (1,), generator=g))
            crops.append(torch.nn.functional.interpolate(t[None, :, y:y + s, x:x + s], size=prep.input_size,
                                                         mode="bilinear", antialias=True)[0])
    x = normalize(torch.stack(crops), prep)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
        [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(20.0)
    return model.eval()


def agreement(full: np.ndarray, draft: np.ndarray, full_px: np.ndarray, draft_px: np.ndarray) -> dict:
    """Answers and inputs on drafted images against the same images fully decoded."""
    pf, pd = softmax(full), softmax(draft)
    dl = np.abs(full - draft)
    dpx = np.abs(full_px.astype(np.int16) - draft_px.astype(np.int16)).astype(np.float64)
    mse = (dpx ** 2).reshape(len(dpx), -1).mean(axis=1)
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))
    return {"images": len(full), "top1_agreement": float((full.argmax(1) == draft.argmax(1)).mean()),
            "top5_overlap": float(np.mean([len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5
                                           for a, b in zip(full, draft)])),
            "max_abs_dlogit": float(dl.max()), "mean_abs_dlogit": float(dl.mean()),
            "max_abs_dprob": float(np.abs(pf - pd).max()),
            "mean_total_variation": float(0.5 * np.abs(pf - pd).sum(axis=1).mean()),
            "pixel_mean_abs": float(dpx.mean()), "pixel_max_abs": float(dpx.max()),
            "pixel_min_psnr_db": float(psnr.min())}


def timing(photo: Image.Image, prep: Preprocessing, sizes: list[tuple[int, int]], quality: int, reps: int,
           margin: float) -> list[dict]:
    """Wall ms of decode + resize + crop, full and at the scale the margin allows (min_pixels ignored): the two
    interleaved rep by rep, so that noise hits both alike; medians, and the spread of the per-rep speed-ups."""
    rows = []
    for size in sizes:
        data = encode(photo.convert("RGB").resize(size, Image.Resampling.BICUBIC), quality)
        scale = jpeg_draft_scale(size, prep, margin, min_pixels=0)
        runs: dict[int, list[float]] = {1: [], scale: []}
        for s in runs:
            decode(data, prep, s)  # warm-up
        for _ in range(reps):
            for s in runs:  # (one entry when the margin allows no reduction: scale 1)
                t = time.perf_counter()
                decode(data, prep, s)
                runs[s].append((time.perf_counter() - t) * 1e3)
        full, draft = runs[1], runs[scale]
        rows.append({"size": list(size), "megapixels": size[0] * size[1] / 1e6, "jpeg_bytes": len(data),
                     "scale": scale, "full_ms": statistics.median(full), "draft_ms": statistics.median(draft),
                     "speedup": spread([f / d for f, d in zip(full, draft)])})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--checkpoint", type=Path, help="a trained 224x224 checkpoint (default: calibrated random init)")
    p.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                   help="reduced shorter side >= margin x resize_size (serve/images.py uses %(default)s)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the corpus")
    p.add_argument("--reps", type=int, default=7, help="timing repetitions, full and reduced interleaved (median)")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "jpeg_draft.json")
    args = p.parse_args()

    photos = photographs()
    if args.checkpoint:
        from ganet.checkpoint import load_checkpoint

        model, info = load_checkpoint(args.checkpoint, "cpu")
        prep = info.preprocessing
    else:
        prep = Preprocessing.for_input_size(224)
        model = default_model(photos, prep)
    results = {"host": {"machine": platform.machine(), "python": platform.python_version(),
                        "pillow": Image.__version__},
               "preprocessing": prep.to_dict(), "model": str(args.checkpoint or "ga_shufflenet_v2 random init, "
                                                                             "BatchNorm calibrated on photo crops"),
               "serving": {"margin": DRAFT_MARGIN, "min_pixels": DRAFT_MIN_PIXELS}}

    sizes = [(640, 427), (1024, 680), (1600, 1064), (2048, 1368), (3000, 2000), (4032, 3024)]
    print(f"decode + resize + crop of coffee.jpg re-encoded at q{args.quality}, median of {args.reps} (ms)")
    results["timing"] = {}
    for margin in args.margins:
        rows = timing(photos["coffee"], prep, sizes, args.quality, args.reps, margin)
        results["timing"][str(margin)] = rows
        print(f"margin {margin:g}: " + "  ".join(f"{r['size'][0]}x{r['size'][1]} 1/{r['scale']} "
                                                   f"{r['full_ms']:.1f}->{r['draft_ms']:.1f} ({r['speedup']['median']:.1f}x)"
                                                   for r in rows))

    jpegs = corpus(photos, args.quality)
    sizes_of = {name: Image.open(io.BytesIO(data)).size for name, data in jpegs}
    full_px = np.stack([decode(data, prep, 1) for _, data in jpegs])  # (N, 3, S, S)
    full = torch_reference(model, prep, full_px)
    results["corpus"] = {"images": len(jpegs), "quality": args.quality, "sizes": sizes_of}
    results["logit_std_across_images"] = float(full.std(axis=0).mean())
    print(f"\n{len(jpegs)} large JPEGs (q{args.quality}; 1080 to 4096 px); logits' std across images "
          f"{results['logit_std_across_images']:.2f} (the scale |delta logit| compares with)")
    print(f"{'margin':>6}{'drafted':>8}{'scales':>14}{'top1 agree':>11}{'top5 ovl':>9}{'max|dlogit|':>12}"
          f"{'mean|dlogit|':>13}{'max|dprob|':>11}{'mean TV':>9}{'px mean':>8}{'px max':>7}{'min PSNR':>9}")
    results["agreement"] = {}
    for margin in args.margins:
        scales = [jpeg_draft_scale(sizes_of[name], prep, margin, min_pixels=0) for name, _ in jpegs]
        idx = [i for i, s in enumerate(scales) if s > 1]
        if not idx:
            continue
        draft_px = np.stack([decode(jpegs[i][1], prep, scales[i]) for i in idx])
        row = agreement(full[idx], torch_reference(model, prep, draft_px), full_px[idx], draft_px)
        row["scales"] = {str(s): scales.count(s) for s in sorted(set(scales))}
        results["agreement"][str(margin)] = row
        print(f"{margin:6g}{len(idx):8d}{str(row['scales']):>14}{row['top1_agreement']:11.1%}"
              f"{row['top5_overlap']:9.1%}{row['max_abs_dlogit']:12.4f}{row['mean_abs_dlogit']:13.5f}"
              f"{row['max_abs_dprob']:11.4f}{row['mean_total_variation']:9.4f}{row['pixel_mean_abs']:8.3f}"
              f"{row['pixel_max_abs']:7.0f}{row['pixel_min_psnr_db']:9.1f}")
    # For scale: the same images decoded fully after one more save at q85, i.e. what a re-save does to the answers.
    resaved = [encode(Image.open(io.BytesIO(data)).convert("RGB"), 85) for _, data in jpegs]
    resaved_px = np.stack([decode(data, prep, 1) for data in resaved])
    row = agreement(full, torch_reference(model, prep, resaved_px), full_px, resaved_px)
    results["reference_resave_q85"] = row
    print(f"{'q85':>6}{len(jpegs):8d}{'(full)':>14}{row['top1_agreement']:11.1%}"
          f"{row['top5_overlap']:9.1%}{row['max_abs_dlogit']:12.4f}{row['mean_abs_dlogit']:13.5f}"
          f"{row['max_abs_dprob']:11.4f}{row['mean_total_variation']:9.4f}{row['pixel_mean_abs']:8.3f}"
          f"{row['pixel_max_abs']:7.0f}{row['pixel_min_psnr_db']:9.1f}   <- reference: re-saved at q85, decoded fully")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    from ganet._io import atomic_write_bytes

    atomic_write_bytes(args.output, (json.dumps(results, indent=2) + "\n").encode())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
