"""The ``ganet-serve`` command: a thin layer over ``ServeSettings`` + ``create_app`` + uvicorn."""
from __future__ import annotations

import argparse
import logging
import socket
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

limits: every request has one deadline (--timeout-ms) from its first byte: body, decode, queue, inference (408
while the body is still arriving, 504 after); images are refused (413) before any pixel is decoded when they have
more than --max-pixels or need more than --max-decode-bytes, which also bounds the memory of all decodes at once;
connections must send their headers within --header-timeout-s and are closed after --keep-alive-s idle; past
--max-connections the longest idle one is closed, or the new one gets 503 + Retry-After.

exit codes: 0 stopped cleanly (SIGTERM/SIGINT: in-flight requests finish within --grace-s); 1 front-end
processes kept dying (--frontends); 2 it cannot start:
a bad option, a model that cannot be served (missing, corrupt or tampered file -- the SHA-256 of every file it
loads is checked against the manifest unless --skip-verify --, input size or labels that do not match the graph),
or the port in use. The message is one line that names the file or the port and the problem."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``ServeSettings`` field: its description, default and environment variable come from there."""
    from typing import Literal, get_args, get_origin

    from pydantic_core import PydanticUndefined

    from ganet.serve.settings import ServeSettings

    p = argparse.ArgumentParser(prog="ganet-serve", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Serve a ganet export (or checkpoint) over HTTP with dynamic batching.",
                                allow_abbrev=False)  # `--workers 2` is an error, not --workers-decode 2
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


def make_server(app, settings, sock: socket.socket):
    """The uvicorn server for ``app`` on the listening socket ``sock``, in one process or in each front end of
    --frontends: connection limits (header and keep-alive timeouts, the connection cap), and SIGTERM in two steps
    (--drain-delay-s, then the graceful shutdown of --grace-s)."""
    import uvicorn

    from ganet.serve.connections import ConnectionLimits, guarded_protocol
    from ganet.serve.drain import DrainingServer
    from ganet.serve.limits import connection_cap

    metrics = app.state.serve.metrics
    cap, why = connection_cap(settings.max_connections)
    limits = ConnectionLimits(settings.header_timeout_s, settings.keep_alive_s, cap, metrics.connections.set,
                              lambda reason: metrics.connections_closed.labels(reason).inc())
    host, port = sock.getsockname()[:2]
    logging.getLogger("ganet.serve").info(
        "listening", extra={"event": "listening", "url": f"http://{host}:{port}", "max_connections": cap, "why": why,
                            "header_timeout_s": settings.header_timeout_s, "keep_alive_s": settings.keep_alive_s})
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=settings.grace_s,
                            lifespan="on", http=guarded_protocol(limits), timeout_keep_alive=settings.keep_alive_s,
                            backlog=LISTEN_BACKLOG)
    return DrainingServer(config, app.state.serve, settings.drain_delay_s)


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

    from ganet.serve.app import create_app, make_gpu_decoder, prepare, warm_up
    from ganet.serve.logs import configure_logging, held_back
    from ganet.serve.startup import StartupError
    from ganet.serve.supervisor import resolve_frontends

    handler = configure_logging(settings.log_level)
    try:
        # first: a port in use is found out before the model loads
        sock = bind(settings.host, settings.port, reuse_port=settings.reuse_port)
    except OSError as e:
        print(f"ganet-serve: error: cannot listen on {settings.host}:{settings.port}: {e.strerror or e} (another "
              "server there? choose another --port)", file=sys.stderr)
        return 2
    try:  # every check that can refuse the model, then the warm-up, before the socket listens
        with held_back(handler):
            backends, spec = prepare(settings)
            frontends = resolve_frontends(settings, backends[0])
            # With --frontends the front ends decode (each its own --decode gpu decoder), and the supervisor warms
            # the model up while they start.
            decoder = make_gpu_decoder(settings, spec) if settings.decode == "gpu" and not frontends else None
            if settings.warmup and not frontends:
                warm_up(backends, spec)
    except (StartupError, RuntimeError) as e:  # RuntimeError: --decode gpu on a host that cannot (says why)
        sock.close()
        print(f"ganet-serve: error: {e}", file=sys.stderr)
        return 2
    if frontends:  # this process owns the model and warms it up; N processes serve HTTP on the socket
        from ganet.serve.supervisor import run_supervisor

        return run_supervisor(settings, backends, spec, frontends, sock)
    # the lifespan starts the batcher
    app = create_app(settings, backends=backends, spec=spec, warmed=True, gpu_decoder=decoder)
    server = make_server(app, settings, sock)
    server.run(sockets=[sock])
    return 0 if server.started else 2


LISTEN_BACKLOG = 2048


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound (uvicorn, or the front ends of --frontends, listen on it once the service is
    ready). ``reuse_port``: SO_REUSEPORT, so that several independent ganet-serve processes share the port and the
    kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    raise SystemExit(main())
