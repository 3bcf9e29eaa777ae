"""The baseline bench_serve.py compares ganet-serve against: the FastAPI server one writes first.

Per request: decode with the same ``ganet.preprocess.image_to_uint8``, run the model on a batch of 1, answer the
top-5. No batching, no decode pool. Library defaults everywhere (ORT's and torch's thread counts), as a first
version would have them. Two styles of endpoint:

* ``--style threadpool`` (default): a plain ``def`` endpoint, so FastAPI runs requests in its threadpool, several
  at a time -- the stronger baseline;
* ``--style async``: ``async def`` with the decode and the inference called inline, the shape of most tutorial
  servers: one request at a time on the event loop (the model's intra-op threads still use every core).

    python benchmarks/naive_server.py --runtime onnxruntime --model EXPORT/model.onnx --port 8001
    python benchmarks/naive_server.py --runtime torch --model ckpt.safetensors --port 8002 --style async
    python benchmarks/naive_server.py --runtime torch --model ckpt.safetensors --port 8003 --device cuda
"""
from __future__ import annotations

import argparse
import io
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from ganet.preprocess import Preprocessing, image_to_uint8


def onnxruntime_runner(onnx_path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exported graph takes uint8 (1, 3, S, S) and normalises inside."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torch_runner(checkpoint: str, device: str = "cpu") -> tuple[Callable[[np.ndarray], np.ndarray], Preprocessing]:
    """PyTorch eager fp32 from the checkpoint the export was made from, normalising as the graph does."""
    import torch

    from ganet.checkpoint import load_checkpoint
    from ganet.preprocess import normalize_uint8

    model, info = load_checkpoint(checkpoint, device)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(normalize_uint8(torch.from_numpy(x).to(device), info.preprocessing)).cpu().numpy()

    return run, info.preprocessing


def create_app(run: Callable[[np.ndarray], np.ndarray], prep: Preprocessing, labels: list[str],
               style: str = "threadpool") -> FastAPI:
    app = FastAPI(title="naive classifier")

    def answer(data: bytes) -> dict:
        image = image_to_uint8(Image.open(io.BytesIO(data)), prep)  # (3, S, S) uint8
        logits = run(image[None])[0]  # (C,)
        e = np.exp(logits - logits.max())
        probs = e / e.sum()
        top = np.argsort(-probs)[:5]
        return {"predictions": [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in top]}

    if style == "threadpool":
        @app.post("/classify")
        def classify(file: UploadFile = File(...)) -> dict:  # sync: FastAPI's threadpool runs it
            return answer(file.file.read())
    else:
        @app.post("/classify")
        async def classify(file: UploadFile = File(...)) -> dict:  # inline: blocks the event loop while it runs
            return answer(await file.read())

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--runtime", choices=["onnxruntime", "torch"], required=True)
    p.add_argument("--model", required=True, help="model.onnx of an export (onnxruntime) or a .safetensors checkpoint")
    p.add_argument("--checkpoint", help="onnxruntime: the checkpoint to read labels and preprocessing from")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--style", choices=["threadpool", "async"], default="threadpool",
                   help="threadpool: a plain def endpoint; async: async def calling the model inline")
    p.add_argument("--device", default="cpu", help="torch: the device the model runs on (cpu, cuda)")
    args = p.parse_args()

    import uvicorn

    from ganet.checkpoint import read_checkpoint_info

    info = read_checkpoint_info(args.checkpoint or args.model)
    if args.runtime == "onnxruntime":
        run, prep = onnxruntime_runner(args.model), info.preprocessing
    else:
        run, prep = torch_runner(args.model, args.device)
    uvicorn.run(create_app(run, prep, list(info.labels), args.style), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
