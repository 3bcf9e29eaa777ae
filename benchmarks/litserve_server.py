"""LitServe serving an export's ``model.onnx`` with LitServe's own dynamic batching: the framework baseline of
``benchmarks/serve_sweep.py`` (ganet-serve and the naive servers of ``naive_server.py`` answer the same requests).

LitServe's stages (its ``LitAPI``): ``decode_request`` reads the multipart field ``file`` and decodes it with
``ganet.preprocess.image_to_uint8`` (the one preprocessing definition), ``batch`` stacks, ``predict`` runs ONNX
Runtime, ``unbatch`` splits, ``encode_response`` answers the top-5 as the other servers do. Configured like
ganet-serve on a CPU by default: one inference worker per usable CPU, one ONNX Runtime thread each, batches of up
to 4 images gathered for at most 2 ms. LitServe runs its API servers and workers as processes of their own.

LitServe 0.2 (``pip install 'litserve>=0.2,<0.3'``, in the ``bench`` extra) needs FastAPI >= 0.112 and uvicorn
>= 0.29, which the project's serving extra already satisfies, so it installs beside it in the same environment.

    python benchmarks/litserve_server.py --export EXPORT_DIR --port 8004
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import litserve as ls
import numpy as np


class ClassifierAPI(ls.LitAPI):
    def __init__(self, export: Path, threads: int, **kwargs) -> None:
        super().__init__(api_path="/classify", **kwargs)
        self.export, self.threads = export, threads

    def setup(self, device: str) -> None:
        from ganet.export.manifest import load_manifest
        from ganet.export.parity import ort_session

        manifest = load_manifest(self.export)
        self.labels, self.prep = manifest.labels, manifest.preprocessing
        self.session = ort_session(self.export / "model.onnx", self.threads, spinning=False)

    def decode_request(self, request) -> np.ndarray:  # the multipart form: {"file": UploadFile}
        from PIL import Image

        from ganet.preprocess import image_to_uint8

        return image_to_uint8(Image.open(io.BytesIO(request["file"].file.read())), self.prep)  # (3, S, S) uint8

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)  # (B, 3, S, S)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": images})[0]  # (B, classes) logits

    def unbatch(self, logits: np.ndarray) -> list[np.ndarray]:
        return list(logits)

    def encode_response(self, logits: np.ndarray) -> dict:
        e = np.exp(logits - logits.max())
        probs = e / e.sum()
        top = np.argsort(-probs)[:5]
        return {"predictions": [{"label": self.labels[i], "index": int(i), "score": float(probs[i])} for i in top]}


def main() -> None:
    from ganet.system import usable_cpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--export", type=Path, required=True, help="a ganet-export directory (its model.onnx is served)")
    p.add_argument("--port", type=int, default=8004)
    p.add_argument("--workers", type=int, default=usable_cpus(), help="inference workers (default: usable CPUs)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per worker (default 1)")
    p.add_argument("--max-batch", type=int, default=4, help="LitServe's max_batch_size (default 4)")
    p.add_argument("--batch-timeout", type=float, default=0.002, help="seconds LitServe waits to fill a batch")
    args = p.parse_args()
    api = ClassifierAPI(args.export, args.threads, max_batch_size=args.max_batch, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
