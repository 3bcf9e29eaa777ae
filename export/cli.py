"""The ``ganet-export`` command: a thin layer over :func:`ganet.export.pipeline.export_checkpoint` and
:func:`ganet.export.verify.verify_export`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Turn a ganet checkpoint into deployable artifacts and prove they compute what the PyTorch model computes.

Always writes, into DIR: model.onnx (fp32; input `image` uint8 (batch, 3, S, S) RGB 0..255 as made by
ganet.preprocess.image_to_uint8, the graph normalises; output `logits` float32 (batch, num_classes)), labels.txt,
report.md (parity and latency tables) and manifest.json (the input contract, preprocessing, labels, exporter and
opset, library versions, SHA-256 of every file, parity results).

Parity is checked against the PyTorch model in fp32 on the CPU, at batch sizes 1, 3 and --max-batch: ONNX Runtime
must match within 1e-4 with 100% top-1 agreement, or the export fails (exit 1) naming the worst inputs. The images:
9 photographs bundled with scikit-learn and scikit-image, plus the held-out split of the checkpoint's data set
where this machine reaches it: the digits always; CIFAR and image folders in the folder the checkpoint records
(ganet-train records it) or --data-dir. The first output line says which. The directory is built beside DIR and
renamed into place at the end: a failed export leaves no DIR, and the next export into DIR removes what a killed
one left behind.
"""

EPILOG = """\
examples:
  ganet-export runs/digits/best.safetensors --output exports/digits
  ganet-export best.safetensors --output exports/cpu --int8           # add an INT8 model for CPU hosts
  ganet-export best.safetensors --output exports/gpu --trt --fp16 --triton --max-batch 64   # on a GPU host
  ganet-export --verify exports/digits                                 # re-hash files, re-run parity

exit codes: 0 success; 1 the export or the verification failed (parity, checks, a file differs);
            2 bad request (missing, corrupt or mismatched checkpoint, DIR not empty without --force, an unusable
            --data-dir, TensorRT missing for --trt), said in one line.
"""


def build_parser() -> argparse.ArgumentParser:
    from ganet.export.data import DEFAULT_HELDOUT_IMAGES
    from ganet.export.manifest import DEFAULT_OPSET

    p = argparse.ArgumentParser(allow_abbrev=False, prog="ganet-export", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", type=Path, metavar="CHECKPOINT",
                   help="a ganet .safetensors checkpoint (from ganet-train or ganet.save_checkpoint)")
    p.add_argument("--output", "-o", type=Path, metavar="DIR", help="export directory to create")
    p.add_argument("--verify", type=Path, metavar="DIR",
                   help="check an existing export instead: re-hash every file listed in its manifest, compare the "
                        "graph with the manifest's contract and re-run ONNX Runtime parity against the checkpoint "
                        "it records; prints every difference, exit 1 if there is any")
    g = p.add_argument_group("artifacts")
    g.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx: ONNX Runtime static quantization (QDQ, per-channel weights). "
                        "Where the checkpoint's data set is reachable (see above), calibrated on its training split "
                        "and gated: the export fails if held-out top-1 drops more than 1 point. Where it is not, "
                        "calibrated on the 9 photographs and NOT gated (agreement with PyTorch is reported only)")
    g.add_argument("--trt", action="store_true",
                   help="also build a TensorRT engine, model.plan (needs TensorRT and an NVIDIA GPU; the engine "
                        "only runs on the same GPU architecture and TensorRT version)")
    g.add_argument("--fp16", action="store_true",
                   help="with --trt: build the engine in fp16 (the GA normalisation and spatial softmax stay fp32)")
    g.add_argument("--triton", action="store_true",
                   help="also write a Triton Inference Server model repository into DIR/triton (the TensorRT "
                        "engine with --trt, else the ONNX model)")
    g = p.add_argument_group("settings")
    g.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="largest batch the artifacts must serve; parity runs at 1, 3 and N (default: %(default)s)")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help="ONNX opset (default: %(default)s, parsed by TensorRT >= 8.6 and current ONNX Runtime)")
    g.add_argument("--simplify", action="store_true",
                   help="simplify the graph (onnxslim if installed, else ONNX Runtime's basic offline optimizer), "
                        "then check parity again")
    g.add_argument("--calibration-images", type=int, default=512, metavar="N",
                   help="with --int8: training images used to calibrate (default: %(default)s)")
    g.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="the checkpoint's data set (CIFAR or image folder) is in DIR here, instead of the folder the "
                        "checkpoint records; an error if its classes are not the checkpoint's labels")
    g.add_argument("--heldout-images", type=int, default=DEFAULT_HELDOUT_IMAGES, metavar="N",
                   help="held-out images in parity and the INT8 gate: at most N, evenly spaced over the split, 0 for "
                        "all (default: %(default)s)")
    g.add_argument("--benchmark-rounds", type=int, default=5, metavar="N",
                   help="rounds of the CPU latency table in report.md, PyTorch eager vs ONNX Runtime; 0 skips it "
                        "(default: %(default)s)")
    g.add_argument("--atol", type=float, metavar="X",
                   help="largest |dlogit| the fp32 ONNX Runtime parity check accepts against PyTorch (default: 1e-4; "
                        "the fused CPU graph gets twice it); top-1 must still agree on every image. For models with "
                        "large logits, whose fp32 rounding differs a little from host to host; recorded in the "
                        "manifest, and --verify re-checks with it")
    g.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.checkpoint is not None or args.output is not None:
            parser.error("--verify DIR takes no CHECKPOINT or --output")
        return _verify(args.verify)
    if args.checkpoint is None or args.output is None:
        parser.error("give CHECKPOINT and --output DIR (or --verify DIR)")

    from ganet.checkpoint import CheckpointError, read_checkpoint_info

    try:  # a malformed file is refused here in a fraction of a second, before the exporter (and torch) load
        read_checkpoint_info(args.checkpoint)
    except CheckpointError as e:
        print(f"ganet-export: error: cannot export: {e}", file=sys.stderr)
        return 2
    from ganet.export.pipeline import ExportError, ExportOptions, ExportUsageError, export_checkpoint

    opts = ExportOptions(output=args.output, trt=args.trt, fp16=args.fp16, int8=args.int8, triton=args.triton,
                         max_batch=args.max_batch, opset=args.opset, force=args.force, simplify=args.simplify,
                         calibration_images=args.calibration_images, benchmark_rounds=args.benchmark_rounds,
                         atol=args.atol, data_dir=args.data_dir, heldout_images=args.heldout_images)
    try:
        out = export_checkpoint(args.checkpoint, opts, log=lambda s: print(s, flush=True))
    except ExportUsageError as e:
        print(f"ganet-export: error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"ganet-export: export failed, nothing was written: {e}", file=sys.stderr)
        return 1
    files = sorted(p.relative_to(out).as_posix() for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}\nnext: ganet-serve {out}   (check it any time: ganet-export --verify "
          f"{out})")
    return 0


def _verify(directory: Path) -> int:
    from ganet.export.manifest import ManifestError
    from ganet.export.verify import verify_export

    try:
        result = verify_export(directory, log=lambda s: print(s, flush=True))
    except ManifestError as e:
        print(f"ganet-export: error: {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    for diff in result.differences:
        print(f"DIFFERS: {diff}", file=sys.stderr)
    if result.ok:
        what = "files, contract and parity" if result.parity_rerun else "files and contract (parity NOT re-run)"
        print(f"{directory}: OK ({what} match the manifest)")
        return 0
    print(f"{directory}: {len(result.differences)} difference(s) from the manifest", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
