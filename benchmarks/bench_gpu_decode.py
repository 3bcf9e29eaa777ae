"""JPEG decode + resize + center crop: the CPU path (``decode_image``: Pillow/libjpeg-turbo and the native resize,
one thread, what each serving decode thread does) against ``--decode gpu`` (``GpuDecoder.decode_batch``: nvJPEG in
batches and the tensor resize), in images/s, on the request image of benchmarks/bench_serve.py (sklearn's
china.jpg, 640x427, JPEG q90) and a 12-megapixel photo-sized JPEG (4032x3024, upscaled from it).

    python benchmarks/bench_gpu_decode.py                       # on a GPU host
    python benchmarks/bench_gpu_decode.py --device cpu --batches 8 --rounds 2     # the CPU form, to check it runs

The GPU path pays off where the decode threads are the limit (CPU ms per image above); its answers can differ from
Pillow's by a few levels (tests/test_gpu_decode.py measures that). Writes benchmarks/results/gpu_decode_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import time
from pathlib import Path

import torch
from PIL import Image

from _stats import spread  # benchmarks/_stats.py
from bench_gpu_model import cpu_model

from ganet._io import atomic_write_bytes
from ganet.preprocess import Preprocessing
from ganet.serve.gpu_decode import GpuDecoder
from ganet.serve.images import decode_image, resizer

ROOT = Path(__file__).resolve().parent.parent


def jpegs() -> dict[str, bytes]:
    from sklearn.datasets import load_sample_image

    china = Image.fromarray(load_sample_image("china.jpg"))
    out = {}
    for name, img in (("640x427", china), ("4032x3024", china.resize((4032, 3024), Image.Resampling.BICUBIC))):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out[name] = buf.getvalue()
    return out


def rate(fn, images: int, rounds: int, seconds: float) -> dict:
    fn()  # warm-up (and, on the GPU, the resize matrices' first copy)
    per_round = []
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or n == 0:
            fn()
            n += images
        per_round.append(n / elapsed)
    return spread(per_round)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="8,64", help="GPU decode batch sizes (default 8,64)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    prep = Preprocessing.for_input_size(224)
    decoder = GpuDecoder(prep, 50_000_000, device=args.device)
    results = {"host": {"cpu": cpu_model(), "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda")
                        else None, "resize": resizer()[1]}, "device": args.device, "results": []}
    print(f"decode + resize + crop at 224, images/s median [min, max] over {args.rounds} rounds "
          f"({results['host']['gpu'] or results['host']['cpu']})")
    try:
        for name, data in jpegs().items():
            cpu = rate(lambda: decode_image(data, prep, 50_000_000), 1, args.rounds, args.seconds)
            results["results"].append({"image": name, "path": "cpu (1 thread)", "batch": 1, "images_per_s": cpu})
            print(f"{name:<10} cpu, 1 thread       {cpu['median']:9.1f} [{cpu['min']:.1f}, {cpu['max']:.1f}]"
                  f"   ({1e3 / cpu['median']:.2f} CPU ms per image)")
            route = decoder.route(data)
            for batch in (int(b) for b in args.batches.split(",")):
                def run():
                    out = decoder.decode_batch([data] * batch, [route] * batch)
                    assert all(o is not None for o in out), "the decoder refused the benchmark image"
                cpu0 = time.process_time()
                gpu = rate(run, batch, args.rounds, args.seconds)
                results["results"].append({"image": name, "path": f"decode_batch on {args.device}", "batch": batch,
                                           "images_per_s": gpu})
                print(f"{name:<10} {args.device}, batch {batch:<4}      {gpu['median']:9.1f} [{gpu['min']:.1f}, "
                      f"{gpu['max']:.1f}]   (process CPU {time.process_time() - cpu0:.1f} s in all)")
    finally:
        decoder.close()
    out = args.output or ROOT / "benchmarks" / "results" / f"gpu_decode_{datetime.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
