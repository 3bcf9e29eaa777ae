"""``POST /classify``: encoded images in (multipart `file` parts or a raw image body), top-k labels out."""
from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ganet.serve.app import StateDep, deadline_of, default_top_k, require_api_key
from ganet.serve.errors import ERROR_RESPONSES, ServeError
from ganet.serve.schemas import BatchClassifyResponse, ClassifyResponse, FileResult, Prediction, Timing

__all__ = ["router", "softmax", "top_k_predictions"]

router = APIRouter(tags=["classify"])

_BODY_DOC = {
    "requestBody": {
        "description": "One image as the raw body (`Content-Type: image/jpeg`, `image/png`, ...), or "
                       "`multipart/form-data` with one or more `file` parts (several parts are classified as one "
                       "batch and answered in order).",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}},
                "required": ["file"]}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64 (exact enough to rank and report tiny scores)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k_predictions(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[Prediction]:
    probs = softmax(logits)  # (C,)
    order = np.argsort(-probs, kind="stable")[:k]
    return [Prediction(label=labels[i], index=int(i), score=float(probs[i])) for i in order]


async def _read_images(request: Request, max_files: int) -> list[tuple[str | None, bytes]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_files)  # the parser itself stops at the limit
        except HTTPException as e:  # Starlette's 400 for a malformed body or too many parts
            if "too many files" in str(e.detail).lower():
                raise ServeError(413, "too_many_files", f"more than {max_files} files in one request (the limit, "
                                                        "--max-files)") from None
            raise ServeError(400, "bad_request", f"malformed multipart body: {e.detail}") from None
        try:
            parts = form.getlist("file")
            if not parts:
                raise ServeError(400, "bad_request", "multipart body has no `file` part; send the image as the "
                                                     "form field `file`")
            out = []
            for part in parts:
                if not isinstance(part, UploadFile):
                    raise ServeError(400, "bad_request", "the `file` field must be a file upload, not a text field")
                out.append((part.filename, await part.read()))
            return out
        finally:
            await form.close()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [(None, await request.body())]
    raise ServeError(415, "unsupported_media_type",
                     f"Content-Type {content_type or '(none)'!r} is not accepted: send the image as the raw body "
                     "with an image/* type, or as multipart/form-data field `file`")


@router.post("/classify", response_model=ClassifyResponse | BatchClassifyResponse,
             dependencies=[Depends(require_api_key)], openapi_extra=_BODY_DOC,
             responses={k: v for k, v in ERROR_RESPONSES.items() if k in (400, 401, 413, 415, 422, 503, 504)},
             summary="Classify one image, or several as one batch")
async def classify(request: Request, state: StateDep,
                   top_k: Annotated[int | None, Query(ge=1, description="how many classes to return (1..num_classes; "
                                                      "default 5, or every class of a model with fewer)")]
                   = None) -> Response:
    start = time.perf_counter()
    if state.spec is None:
        raise ServeError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "1"})
    if top_k is None:
        top_k = default_top_k(state.spec.num_classes)
    if top_k > state.spec.num_classes:
        raise ServeError(422, "validation_error", f"top_k must be between 1 and {state.spec.num_classes} (the "
                                                  f"model's classes), got {top_k}")
    deadline = deadline_of(request)
    files = await _read_images(request, state.settings.max_files)
    decoded = await state.decode_all([d for _, d in files], deadline, [n for n, _ in files])
    results = await state.infer([image for image, _ in decoded], deadline)
    timing = Timing(queue=max(r.queue_s for r in results) * 1e3, decode=sum(s for _, s in decoded) * 1e3,
                    inference=max(r.inference_s for r in results) * 1e3,
                    total=(time.perf_counter() - start) * 1e3)
    labels, name = state.spec.labels, state.spec.name
    if len(files) == 1:
        answer = ClassifyResponse(model=name, predictions=top_k_predictions(results[0].logits, labels, top_k),
                                  timing_ms=timing, batch_size=results[0].batch_size)
    else:
        answer = BatchClassifyResponse(model=name, timing_ms=timing, results=[
            FileResult(filename=fname, predictions=top_k_predictions(r.logits, labels, top_k), batch_size=r.batch_size)
            for (fname, _), r in zip(files, results)])
    # Built and validated once, serialised once: returned as a model, FastAPI would validate it again against the
    # response_model union (which stays, for the OpenAPI schema).
    return Response(answer.model_dump_json(), media_type="application/json")
