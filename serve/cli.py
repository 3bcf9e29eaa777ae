"""The ``ganet-serve`` command: a thin layer over ``ServeSettings`` + ``create_app`` + uvicorn."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]

EPILOG = """\
every option can also be set by an environment variable: GANET_<OPTION> (e.g. GANET_MAX_BATCH=16,
GANET_API_KEY=secret); flags win over the environment.

endpoints: POST /classify (multipart `file` or raw image/* body; ?top_k=5), the Open Inference Protocol v2
(/v2/health/live, /v2/health/ready, /v2/models/NAME[/ready|/infer]), GET /metrics (Prometheus), GET / (a page to
drop an image on), GET /docs (OpenAPI).

examples:
  ganet-serve exports/digits                                   # ONNX Runtime on the CPU (or CUDA if present)
  ganet-serve exports/gpu --backend tensorrt --max-batch 64 --host 0.0.0.0
  ganet-serve runs/digits/best.safetensors --backend torch     # a checkpoint, PyTorch eager
  GANET_API_KEY=secret ganet-serve exports/digits --cors-origins https://example.org

exit codes: 0 stopped cleanly; 2 bad option or a model that cannot be served (the message says why)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ganet-serve", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Serve a ganet export (or checkpoint) over HTTP with dynamic batching.")
    a = p.add_argument
    a("model", nargs="?", help="export directory from ganet-export (or a .safetensors checkpoint for --backend torch)"
                               "; env GANET_MODEL")
    a("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"],
      help="auto (default) picks tensorrt (engine + GPU) > onnxruntime > torch and logs why")
    a("--model-name", help="name under /v2/models/ (default: the architecture name)")
    a("--host", help="bind address (default 127.0.0.1)")
    a("--port", type=int, help="port (default 8000)")
    a("--max-batch", type=int, help="largest batch one inference call runs (default: the export's max_batch)")
    a("--max-delay-us", type=int, help="how long a batch waits for more images after its first (default 2000)")
    a("--queue-size", type=int, help="images waiting for inference before 503 + Retry-After (default 256)")
    a("--timeout-ms", type=float, help="per-request deadline; past it 504 (default 10000)")
    a("--workers-decode", type=int, help="image-decoding threads (default: the CPU count)")
    a("--instances", type=int, help="model instances, one inference thread each (default 1)")
    a("--intra-op-threads", type=int, help="threads inside one inference call (default 0: the CPU count)")
    a("--device", help="torch backend: cuda or cpu (default: cuda when available)")
    a("--api-key", help="require Authorization: Bearer KEY on /classify and /v2/.../infer (prefer GANET_API_KEY)")
    a("--cors-origins", help="comma-separated origins allowed by CORS (default: none, no CORS headers)")
    a("--grace-s", type=float, help="on SIGTERM, seconds to finish in-flight requests (default 10)")
    a("--max-body-bytes", type=int, help="larger request bodies get 413 (default 20 MiB)")
    a("--max-pixels", type=int, help="images with more pixels get 413, read from the header (default 50e6)")
    a("--max-files", type=int, help="most images in one request (default 64)")
    a("--no-warmup", dest="warmup", action="store_const", const=False, help="skip the warm-up (not for production)")
    a("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from ganet.serve.settings import ServeSettings

    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = ServeSettings(**given)
    except ValidationError as e:
        problems = "; ".join(("MODEL (or GANET_MODEL)" if err["loc"] == ("model",) else
                              f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}") + f": {err['msg']}"
                             for err in e.errors())
        print(f"ganet-serve: error: {problems}", file=sys.stderr)
        return 2

    import uvicorn

    from ganet.serve.app import create_app, load_backends
    from ganet.serve.logs import configure_logging

    configure_logging(settings.log_level)
    try:  # load before binding the port, so that a model that cannot be served is a clean exit 2
        backends, spec = load_backends(settings)
    except (ValueError, RuntimeError, OSError) as e:  # manifest, checkpoint, backend, engine-mismatch errors
        print(f"ganet-serve: error: {e}", file=sys.stderr)
        return 2
    app = create_app(settings, backends=backends, spec=spec)  # the lifespan warms up, then turns ready
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.grace_s, lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 2


if __name__ == "__main__":
    raise SystemExit(main())
