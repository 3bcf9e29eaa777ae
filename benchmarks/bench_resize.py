"""The serving decoder's resize + crop: Pillow (``image_to_uint8``) against the native kernel
(``ganet.kernels.resample``), on real photographs, landscape and portrait, one thread.

Both give the same bytes (checked here for every photo before it is timed); this measures what the native one
saves per image. Each (photo, implementation) is timed in interleaved rounds of CPU time (``time.thread_time``),
and the report gives the median and spread of the per-round ratio.

    python benchmarks/bench_resize.py
    python benchmarks/bench_resize.py --size 160 --rounds 20

Writes benchmarks/results/resize.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _stats import spread  # benchmarks/_stats.py (scripts run from this folder)

from ganet._io import atomic_write_bytes
from ganet.export.parity import photo_arrays
from ganet.kernels.resample import load
from ganet.preprocess import Preprocessing, image_to_uint8


def cpu_ms(fn, img: Image.Image, prep: Preprocessing, repeat: int) -> float:
    start = time.thread_time()
    for _ in range(repeat):
        fn(img, prep)
    return (time.thread_time() - start) / repeat * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--size", type=int, default=224, help="network input size (resize = size * 256 / 224)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds per photo (default 10)")
    p.add_argument("--repeat", type=int, default=30, help="calls per timing (default 30)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "resize.json")
    args = p.parse_args()

    native = load()
    if native is None:
        raise SystemExit("bench_resize: the native resize is unavailable here (no C compiler, GANET_DISABLE_KERNELS, "
                         "or it differs from this Pillow): nothing to compare")
    prep = Preprocessing.for_input_size(args.size)
    rows = []
    for key, array in photo_arrays().items():
        photo = Image.fromarray(array)
        for img in (photo, photo.transpose(Image.Transpose.ROTATE_90)):
            img.load()
            assert np.array_equal(native(img, prep), image_to_uint8(img, prep)), f"{key} {img.size}: not identical"
            pillow_ms, native_ms = [], []
            for _ in range(args.rounds):
                pillow_ms.append(cpu_ms(image_to_uint8, img, prep, args.repeat))
                native_ms.append(cpu_ms(native, img, prep, args.repeat))
            ratios = [a / b for a, b in zip(pillow_ms, native_ms)]
            rows.append({"photo": key, "size": list(img.size), "pillow_ms": spread(pillow_ms),
                         "native_ms": spread(native_ms), "speedup": spread(ratios)})
            print(f"{key.split(':')[-1]:18} {img.size[0]:4}x{img.size[1]:<4}  Pillow {rows[-1]['pillow_ms']['median']:5.2f}"
                  f" ms  native {rows[-1]['native_ms']['median']:5.2f} ms  x{rows[-1]['speedup']['median']:.2f} "
                  f"(rounds {rows[-1]['speedup']['min']:.2f}-{rows[-1]['speedup']['max']:.2f})", flush=True)
    result = {"host": {"machine": platform.machine(), "python": platform.python_version(),
                       "pillow": Image.__version__, "pass_order": native.keywords["order"]},
              "config": {"input_size": args.size, "resize_size": prep.resize_size, "rounds": args.rounds,
                         "repeat": args.repeat},
              "photos": rows,
              "speedup_median_over_photos": float(np.median([r["speedup"]["median"] for r in rows]))}
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"identical bytes on all {len(rows)} photos; median speed-up x{result['speedup_median_over_photos']:.2f}. "
          f"Wrote {args.out}")


if __name__ == "__main__":
    main()
