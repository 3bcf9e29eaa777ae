"""The Open Inference Protocol v2 (KServe / Triton) over REST, with Triton's binary tensor extension.

Input `image`: UINT8 [B, 3, S, S] RGB 0..255 (the exported graph's contract), FP32 of the same shape (values
0..255, rounded to the nearest integer, since the graph reads uint8), or BYTES [B] / [B, 1] of encoded images that
the server decodes like /classify (binary extension: raw bytes; JSON: base64 strings). Output `logits`: FP32
[B, num_classes]. Every image goes through the same dynamic batcher as /classify.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ganet.serve.app import ServeState, StateDep, _version, deadline_of, require_api_key
from ganet.serve.budget import json_parse_bytes
from ganet.serve.decode import run_budgeted
from ganet.serve.errors import ERROR_RESPONSES, ServeError
from ganet.serve.limits import header_int
from ganet.serve.schemas import (V2InferRequest, V2InferResponse, V2ModelMetadata, V2ServerMetadata, V2Tensor,
                                 V2TensorMetadata)

__all__ = ["router", "INPUT_NAME", "OUTPUT_NAME", "unpack_bytes"]

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
INPUT_NAME, OUTPUT_NAME = "image", "logits"
VERSION = "1"
_ERRORS = {k: v for k, v in ERROR_RESPONSES.items() if k in (400, 401, 413, 415, 503, 504)}
_ERRORS[404] = {"model": ERROR_RESPONSES[400]["model"], "description": "unknown model or version (`not_found`)"}


def _check_model(state: ServeState, name: str, version: str | None) -> None:
    if state.spec is None or name != state.spec.name:
        served = state.spec.name if state.spec else "(loading)"
        raise ServeError(404, "not_found", f"unknown model {name!r}; this server serves {served!r}")
    if version is not None and version != VERSION:
        raise ServeError(404, "not_found", f"unknown version {version!r} of model {name!r}; available: [{VERSION!r}]")


@router.get("", response_model=V2ServerMetadata, summary="Server metadata")
async def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="ganet-serve", version=_version(), extensions=["binary_tensor_data"])


@router.get("/health/live", summary="200 while the process runs")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="200 once the model is loaded and warmed up, 503 before and while stopping",
            responses={503: ERROR_RESPONSES[503]})
async def ready(state: StateDep) -> dict:
    if not state.ready or state.draining:
        raise ServeError(503, "not_ready", "not ready: the model is loading, warming up or shutting down")
    return {"ready": True}


def _metadata(state: ServeState, name: str, version: str | None) -> V2ModelMetadata:
    _check_model(state, name, version)
    spec, backend = state.spec, state.backends[0]
    s = spec.preprocessing.input_size
    return V2ModelMetadata(
        name=spec.name, versions=[VERSION], platform=f"ganet_{backend.name}",
        inputs=[V2TensorMetadata(name=INPUT_NAME, datatype="UINT8", shape=[-1, 3, s, s])],
        outputs=[V2TensorMetadata(name=OUTPUT_NAME, datatype="FP32", shape=[-1, spec.num_classes])],
        parameters={"labels": list(spec.labels), "preprocessing": spec.preprocessing.to_dict(),
                    "max_batch": spec.max_batch, "backend": backend.name, "device": backend.device,
                    "also_accepts": "image as FP32 [B,3,S,S] (0..255) or BYTES [B] (encoded images)"})


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=_ERRORS, summary="Model metadata")
async def model_metadata(name: str, state: StateDep) -> V2ModelMetadata:
    return _metadata(state, name, None)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=_ERRORS,
            summary="Model metadata (versioned)")
async def model_metadata_version(name: str, version: str, state: StateDep) -> V2ModelMetadata:
    return _metadata(state, name, version)


async def _model_ready(state: ServeState, name: str, version: str | None) -> dict:
    _check_model(state, name, version)
    if not state.ready:
        raise ServeError(503, "not_ready", f"model {name!r} is not ready (warming up or shutting down)")
    return {"name": name, "ready": True}


@router.get("/models/{name}/ready", responses=_ERRORS, summary="200 when the model is ready")
async def model_ready(name: str, state: StateDep) -> dict:
    return await _model_ready(state, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=_ERRORS, summary="Model ready (versioned)")
async def model_ready_version(name: str, version: str, state: StateDep) -> dict:
    return await _model_ready(state, name, version)


def unpack_bytes(raw: bytes, limit: int | None = None) -> list[bytes]:
    """Triton's binary BYTES serialisation: each element is a 4-byte little-endian length, then the bytes. More
    than ``limit`` elements is a 400 as soon as the next one starts (a 20 MB body of empty elements is not
    unpacked into five million objects first)."""
    out, pos = [], 0
    while pos < len(raw):
        if limit is not None and len(out) >= limit:
            raise ServeError(400, "invalid_tensor", f"BYTES tensor: more than the {limit} elements its shape "
                                                    "declares")
        if pos + 4 > len(raw):
            raise ServeError(400, "invalid_tensor", "BYTES tensor: truncated element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ServeError(400, "invalid_tensor", f"BYTES tensor: element of {n} bytes runs past the data")
        out.append(raw[pos:pos + n])
        pos += n
    return out


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensors after it (binary tensor extension), or the whole body as JSON."""
    if header_length is None:
        return body, b""
    length = header_int(header_length)
    if length is None or length > len(body):
        shown = header_length if len(header_length) <= 40 else header_length[:40] + "..."
        raise ServeError(400, "bad_request", f"Inference-Header-Content-Length {shown!r} is not a length (ASCII "
                                             f"digits) within the {len(body)}-byte body")
    return body[:length], body[length:]


def _parse(json_part: bytes) -> V2InferRequest:
    try:
        return V2InferRequest.model_validate_json(json_part)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise ServeError(400, "bad_request", f"invalid inference request: {problems[:2000]}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ServeError(400, "bad_request", f"invalid inference request: {str(e)[:500]}") from None


def _pixels(tensor: V2Tensor, raw: bytes | None, sample: tuple[int, int, int]) -> np.ndarray:
    """UINT8 or FP32 [B, 3, S, S] -> uint8 (B, 3, S, S)."""
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[1:] != sample or shape[0] < 1:
        raise ServeError(400, "invalid_tensor", f"input {INPUT_NAME!r} {tensor.datatype}: expected shape "
                                                f"[B, {', '.join(map(str, sample))}], got {list(shape)}")
    dtype = np.dtype(np.uint8) if tensor.datatype == "UINT8" else np.dtype("<f4")
    count = int(np.prod(shape))
    data = tensor.data if tensor.data is not None else []
    if raw is None and len(data) != count:  # before converting anything
        raise ServeError(400, "invalid_tensor", f"input {INPUT_NAME!r}: shape {list(shape)} needs {count} values, "
                                                f"got {len(data)}")
    try:
        if raw is not None:
            values = np.frombuffer(raw, dtype=dtype) if len(raw) % dtype.itemsize == 0 else np.zeros(0, dtype)
        else:
            values = np.asarray(data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError, OverflowError) as e:  # strings, nested lists, nulls, integers past float64
        raise ServeError(400, "invalid_tensor", f"input {INPUT_NAME!r}: data is not a flat list of numbers "
                                                f"({type(e).__name__}: {str(e)[:200]})") from None
    if values.size != count:
        raise ServeError(400, "invalid_tensor", f"input {INPUT_NAME!r}: shape {list(shape)} needs {count} values, "
                                                f"got {values.size}")
    if values.dtype != np.uint8:
        if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 255:
            raise ServeError(400, "invalid_tensor", f"input {INPUT_NAME!r}: pixel values must lie in 0..255")
        values = np.rint(values).astype(np.uint8)
    return values.reshape(shape)


def _encoded(tensor: V2Tensor, raw: bytes | None) -> list[bytes]:
    shape = tuple(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise ServeError(400, "invalid_tensor", f"BYTES input {INPUT_NAME!r}: expected shape [B] or [B, 1] of "
                                                f"encoded images, got {list(shape)}")
    if raw is not None:
        items = unpack_bytes(raw, limit=shape[0])
    else:
        if tensor.data is not None and len(tensor.data) != shape[0]:
            raise ServeError(400, "invalid_tensor", f"BYTES input: shape {list(shape)} but {len(tensor.data)} "
                                                    "elements")
        try:
            items = [base64.b64decode(x, validate=True) for x in (tensor.data or []) if isinstance(x, str)]
        except (binascii.Error, ValueError):
            items = None
        if items is None or len(items) != len(tensor.data or []):
            raise ServeError(400, "invalid_tensor", "BYTES input in JSON must hold base64-encoded images (or use "
                                                    "the binary tensor extension)") from None
    if len(items) != shape[0]:
        raise ServeError(400, "invalid_tensor", f"BYTES input: shape {list(shape)} but {len(items)} elements")
    return items


@dataclass
class _Request:
    req: V2InferRequest
    images: list[np.ndarray] | None  # UINT8 / FP32 pixels
    encoded: list[bytes] | None  # BYTES: encoded images still to decode


def _prepare(json_part: bytes, binary: bytes, spec_shape: tuple[int, int, int], max_files: int) -> _Request:
    """The request parsed and checked, its tensors unpacked: everything before decoding and inference (run on a
    thread when the JSON is large)."""
    req = _parse(json_part)
    if len(req.inputs) != 1 or req.inputs[0].name != INPUT_NAME:
        raise ServeError(400, "invalid_tensor", f"expected exactly one input named {INPUT_NAME!r}, got "
                                                f"{[t.name for t in req.inputs][:8]}")
    tensor = req.inputs[0]
    size = (tensor.parameters or {}).get("binary_data_size")
    raw = None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > len(binary):
            raise ServeError(400, "invalid_tensor", f"binary_data_size {str(size)[:40]!r} does not fit the "
                                                    f"{len(binary)} binary bytes after the JSON header")
        raw = binary[:size]
    if tensor.datatype not in ("UINT8", "FP32", "BYTES"):
        raise ServeError(400, "invalid_tensor", f"input {INPUT_NAME!r}: datatype {tensor.datatype[:40]!r} is not "
                                                "accepted; expected UINT8, FP32 or BYTES")
    if tensor.shape and tensor.shape[0] > max_files:  # before any pixel is parsed or decoded
        raise ServeError(413, "too_many_files", f"{tensor.shape[0]} images exceed the limit of {max_files}")
    for out in req.outputs or []:
        if out.name != OUTPUT_NAME:
            raise ServeError(400, "invalid_tensor", f"unknown output {out.name[:80]!r}; the model has "
                                                    f"{OUTPUT_NAME!r}")
    if tensor.datatype == "BYTES":
        return _Request(req, None, _encoded(tensor, raw))
    return _Request(req, list(_pixels(tensor, raw, spec_shape)), None)


# JSON headers up to this size are parsed on the event loop (a tritonclient request's is ~200 bytes); larger ones
# on a decode thread, inside the decode budget, so that a 64-image JSON body never stalls the other requests.
INLINE_JSON_BYTES = 64 * 1024

_INFER_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "binary tensor extension: a JSON header of "
                                                "Inference-Header-Content-Length bytes, then the binary tensors"}}},
    "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    "description": "binary tensor extension: the length of the JSON header that starts the body; "
                                   "the binary tensors (`binary_data_size` bytes each, in input order) follow"}]}


@router.post("/models/{name}/infer", response_model=V2InferResponse, responses=_ERRORS,
             dependencies=[Depends(require_api_key)], summary="Inference (JSON or binary tensor extension)",
             openapi_extra=_INFER_DOC)
async def infer(name: str, request: Request, state: StateDep) -> Response:
    return await _infer(state, request, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse, responses=_ERRORS,
             dependencies=[Depends(require_api_key)], summary="Inference (versioned)", openapi_extra=_INFER_DOC)
async def infer_version(name: str, version: str, request: Request, state: StateDep) -> Response:
    return await _infer(state, request, name, version)


async def _infer(state: ServeState, request: Request, name: str, version: str | None) -> Response:
    _check_model(state, name, version)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise ServeError(415, "unsupported_media_type", "compressed requests are not accepted; send identity")
    deadline = deadline_of(request)
    json_part, binary = _split(await request.body(), request.headers.get("inference-header-content-length"))
    args = (json_part, binary, state.spec.input_shape, state.settings.max_files)
    if len(json_part) <= INLINE_JSON_BYTES:
        parsed = _prepare(*args)
    else:
        parsed = await run_budgeted(state.decode_pool, state.budget, json_parse_bytes(len(json_part)), deadline,
                                    "the JSON request", _prepare, *args)
    req = parsed.req
    if parsed.encoded is not None:
        images = [image for image, _ in await state.decode_all(parsed.encoded, deadline)]
    else:
        images = parsed.images
    results = await state.infer(images, deadline)
    logits = np.stack([r.logits for r in results]).astype("<f4")  # (B, C)
    if req.outputs:
        wants_binary = bool((req.outputs[0].parameters or {}).get("binary_data", False))
    else:
        wants_binary = bool((req.parameters or {}).get("binary_data_output", False))
    header = {"model_name": state.spec.name, "model_version": VERSION, "outputs": [
        {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(logits.shape)}]}
    if req.id is not None:
        header["id"] = req.id
    if not wants_binary:
        header["outputs"][0]["data"] = logits.reshape(-1).tolist()
        return JSONResponse(header)
    data = logits.tobytes()
    header["outputs"][0]["parameters"] = {"binary_data_size": len(data)}
    head = json.dumps(header, separators=(",", ":")).encode()
    return Response(head + data, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})
