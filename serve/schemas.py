"""Response bodies of /classify and the Open Inference Protocol v2 routes (the OpenAPI docs are built from these)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["Prediction", "Timing", "ClassifyResponse", "FileResult", "BatchClassifyResponse", "V2Tensor",
           "V2InferRequest", "V2InferResponse", "V2TensorMetadata", "V2ModelMetadata", "V2ServerMetadata"]


class Prediction(BaseModel):
    label: str = Field(description="class name, from the export's labels")
    index: int = Field(description="class index into the model's output")
    score: float = Field(description="softmax probability in [0, 1]")


class Timing(BaseModel):
    queue: float = Field(description="ms waiting for a batch to start (the slowest image of the request)")
    decode: float = Field(description="ms decoding, resizing and cropping (summed over the request's images)")
    inference: float = Field(description="ms of the backend call that ran the batch")
    total: float = Field(description="ms in the server, from the request to the response")


class ClassifyResponse(BaseModel):
    """The answer to one image."""

    model: str = Field(description="served model name")
    predictions: list[Prediction] = Field(description="the top_k classes, highest score first")
    timing_ms: Timing = Field(description="where the time went, in milliseconds")
    batch_size: int = Field(description="images in the backend call that ran this image (dynamic batching)")


class FileResult(BaseModel):
    filename: str | None = Field(description="the multipart part's filename")
    predictions: list[Prediction] = Field(description="the top_k classes, highest score first")
    batch_size: int = Field(description="images in the backend call that ran this image")


class BatchClassifyResponse(BaseModel):
    """The answer to several `file` parts: one entry in `results` per file, in the order they were sent."""

    model: str = Field(description="served model name")
    results: list[FileResult] = Field(description="one result per `file` part, in request order")
    timing_ms: Timing = Field(description="for the whole request; queue and inference: the slowest image")


class V2Tensor(BaseModel):
    name: str = Field(description="`image` (input) or `logits` (output)")
    shape: list[int] = Field(description="tensor shape, e.g. [B, 3, S, S] (UINT8/FP32) or [B] (BYTES)")
    datatype: str = Field(description="UINT8 or FP32 (pixels 0..255, RGB NCHW) or BYTES (encoded images)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size for the binary extension")
    data: list[Any] | None = Field(None, description="row-major flattened values; BYTES as base64 strings")


class V2RequestedOutput(BaseModel):
    name: str = Field(description="`logits`")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data: true` for a binary output")


class V2InferRequest(BaseModel):
    """Open Inference Protocol v2 inference request (JSON, or JSON + binary tensors with the binary extension)."""

    id: str | None = Field(None, description="echoed in the response")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_output: true`: binary outputs")
    inputs: list[V2Tensor] = Field(description="exactly one input, `image`")
    outputs: list[V2RequestedOutput] | None = Field(None, description="omitted: every output (`logits`)")


class V2InferResponse(BaseModel):
    model_name: str = Field(description="the served model")
    model_version: str | None = Field(None, description="always `1`")
    id: str | None = Field(None, description="the request's id, if it had one")
    outputs: list[V2Tensor] = Field(description="`logits`: FP32 [B, num_classes], unnormalised")


class V2TensorMetadata(BaseModel):
    name: str = Field(description="tensor name")
    datatype: str = Field(description="v2 datatype: UINT8, FP32, BYTES")
    shape: list[int] = Field(description="-1 is the dynamic batch axis")


class V2ModelMetadata(BaseModel):
    name: str = Field(description="the served model")
    versions: list[str] = Field(description="always `[\"1\"]`")
    platform: str = Field(description="`ganet_<backend>`")
    inputs: list[V2TensorMetadata] = Field(description="`image`: UINT8 [-1, 3, S, S] RGB 0..255")
    outputs: list[V2TensorMetadata] = Field(description="`logits`: FP32 [-1, num_classes]")
    parameters: dict[str, Any] | None = Field(None, description="labels, preprocessing, max_batch, backend")


class V2ServerMetadata(BaseModel):
    name: str = Field(description="`ganet-serve`")
    version: str = Field(description="the ganet version")
    extensions: list[str] = Field(description="protocol extensions: `binary_tensor_data`")
