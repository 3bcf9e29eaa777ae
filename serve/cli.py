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
  ganet-serve exports/gpu --backend tensorrt --frontends 4     # 4 HTTP processes feed one model owner

exit codes: 0 stopped cleanly; 1 front-end processes kept dying (--frontends); 2 bad option or a model that
cannot be served (the message says why)."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``ServeSettings`` field: its description, default and environment variable come from there."""
    from typing import Literal, get_args, get_origin

    from pydantic_core import PydanticUndefined

    from ganet.serve.settings import ServeSettings

    p = argparse.ArgumentParser(prog="ganet-serve", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Serve a ganet export (or checkpoint) over HTTP with dynamic batching.")
    for name, field in ServeSettings.model_fields.items():
        env = f"GANET_{name.upper()}"
        if name == "model":
            p.add_argument("model", nargs="?", help=f"{field.description}; env {env}")
            continue
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        args = [a for a in get_args(annotation) if a is not type(None)]
        if args and get_origin(annotation) is not Literal:  # X | None
            annotation = args[0]
        if field.default_factory is not None:
            default = "the CPU count" if name == "workers_decode" else "computed"
        else:
            default = "none" if field.default in (None, "", PydanticUndefined) else field.default
        mentioned = "default" in (field.description or "")  # the description already says what happens
        help_text = f"{field.description} ({'' if mentioned else f'default: {default}; '}env {env})"
        if annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(annotation) is Literal:
            p.add_argument(flag, choices=get_args(annotation), help=help_text)
        else:
            kind = annotation if annotation in (int, float) else str
            p.add_argument(flag, type=kind, metavar=name.upper(), help=help_text)
    return p


def uvicorn_config(app, settings, **where):
    """uvicorn's settings for ganet-serve, in one process or in each front end of --frontends (``where``: host and
    port; nothing where the listening socket is passed to ``Server.run``)."""
    import uvicorn

    return uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=settings.grace_s,
                          lifespan="on", **where)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from ganet.serve.settings import ServeSettings

    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = ServeSettings(**given)
    except ValidationError as e:
        problems = "; ".join("MODEL is required: an export directory from ganet-export, or a checkpoint with "
                             "--backend torch (or set GANET_MODEL)" if err["loc"] == ("model",) and
                             err["type"] == "missing" else
                             ("MODEL" if err["loc"] == ("model",) else
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
    from ganet.serve.supervisor import bind_listener, resolve_frontends, run_supervisor

    frontends = resolve_frontends(settings, backends[0])
    if frontends:  # this process owns the model; N processes serve HTTP
        return run_supervisor(settings, backends, spec, frontends)
    sockets = None
    if settings.reuse_port:
        try:
            sockets = [bind_listener(settings.host, settings.port, reuse_port=True)]
        except OSError as e:
            print(f"ganet-serve: error: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
    app = create_app(settings, backends=backends, spec=spec)  # the lifespan warms up, then turns ready
    server = uvicorn.Server(uvicorn_config(app, settings, host=settings.host, port=settings.port))
    server.run(sockets=sockets)
    return 0 if server.started else 2


if __name__ == "__main__":
    raise SystemExit(main())
