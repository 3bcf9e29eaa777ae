"""Every ``ganet-serve`` option, from the command line or from ``GANET_*`` environment variables."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ganet.system import usable_cpus

__all__ = ["ServeSettings", "BackendName"]

BackendName = Literal["auto", "tensorrt", "onnxruntime", "torch"]


class ServeSettings(BaseSettings):
    """Command-line flags win over ``GANET_<NAME>`` environment variables, which win over these defaults."""

    model_config = SettingsConfigDict(env_prefix="GANET_", extra="forbid", protected_namespaces=())

    model: Path = Field(description="export directory from ganet-export (or a .safetensors checkpoint for torch)")
    backend: BackendName = Field("auto", description="auto picks tensorrt > onnxruntime > torch")
    precision: Literal["fp32", "int8", "fp16", "bf16"] = Field(
        "fp32", description="int8: ONNX Runtime runs the export's INT8 model (ganet-export --int8, accuracy drop in "
        "its manifest); faster on CPUs with VNNI. fp16, bf16: the torch backend runs a converted copy of the "
        "checkpoint's model (GA normalisation and softmax kept in fp32), for GPUs")
    fused_kernels: bool = Field(True, description="ONNX Runtime on the CPU runs the export's model.fused.onnx, "
                                "each Group Attention block one native kernel (built with the host's C compiler on "
                                "first use); without a compiler, or with --no-fused-kernels, the standard graph")
    model_name: str | None = Field(None, description="name served under /v2/models/{name} (default: the model's)")
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 to accept other hosts)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    max_batch: int | None = Field(None, ge=1, description="largest batch (default: the export's max_batch; 4 for "
                                  "ONNX Runtime on the CPU, where larger batches cost as much per image)")
    max_delay_us: int = Field(2000, ge=0, description="how long a batch waits for more requests after its first")
    queue_size: int = Field(256, ge=1, description="images waiting for inference; more -> 503 + Retry-After")
    timeout_ms: float = Field(10_000, gt=0, description="per-request deadline from its first byte: body (-> 408), "
                              "decode, queue and inference (-> 504)")
    workers_decode: int = Field(default_factory=lambda: usable_cpus(), ge=1,
                                description="threads that decode images (default: the CPUs this process may use)")
    instances: int | None = Field(None, ge=1, description="model instances, one inference worker thread each "
                                  "(default: ONNX Runtime on the CPU, one per intra-op-threads CPUs, so that every "
                                  "core can run inference; otherwise 1)")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime / torch threads per instance (0: half "
                                "the CPU count, at least 1; the rest decode and serve HTTP)")
    device: str | None = Field(None, description="torch backend: cuda or cpu (default: cuda if available)")
    cuda_graphs: bool | None = Field(None, description="record the model once per batch bucket (1, 2, 4, 8, 16, "
                                     "24, 32, 48, ... up to --max-batch) and replay it, padding each batch to its "
                                     "bucket (default: on for torch on CUDA and for TensorRT, off for ONNX Runtime, "
                                     "where --cuda-graphs needs its CUDA execution provider)")
    decode: Literal["cpu", "gpu"] = Field("cpu", description="gpu: decode JPEGs with nvJPEG and resize them on the "
                                          "GPU in batches (needs torch + torchvision with CUDA); other formats and "
                                          "JPEGs nvJPEG refuses take the CPU path (/metrics counts each path)")
    # min_length: an empty key (GANET_API_KEY= left blank) would let a bare "Authorization: Bearer" in.
    api_key: SecretStr | None = Field(None, min_length=1, description="if set, inference routes need "
                                      "Authorization: Bearer KEY")
    cors_origins: str = Field("", description="comma-separated allowed origins; empty: no CORS headers")
    grace_s: float = Field(10.0, ge=0, description="SIGTERM: seconds to finish in-flight requests")
    drain_delay_s: float = Field(0.0, ge=0, description="SIGTERM: seconds /v2/health/ready answers 503 while "
                                 "requests are still served, before the socket closes, so that load balancers "
                                 "polling it stop sending first (0: close at once, as under Kubernetes, whose "
                                 "preStop hook does this)")
    engine_cache: Path | None = Field(None, description="TensorRT: a directory (a volume) for engines built here "
                                      "from the export's ONNX when it has no engine for this GPU and TensorRT "
                                      "version; reused on the next start (ganet/serve/engine_cache.py)")
    max_body_bytes: int = Field(20 * 2**20, ge=1, description="larger request bodies -> 413")
    max_pixels: int = Field(50_000_000, ge=1, description="images with more pixels (read from the header) -> 413")
    max_files: int = Field(64, ge=1, description="most images in one /classify request")
    warmup: bool = Field(True, description="run every batch size once before turning ready")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="structured log level")
    max_decode_bytes: int = Field(2**30, ge=2**20, description="decode budget: bytes that the images (and large "
                                  "JSON bodies) being decoded at once may take, estimated from each header before "
                                  "any pixel is decoded; an image that alone needs more -> 413, others wait for "
                                  "room within their deadline (default 1 GiB: a 50-megapixel RGB PNG needs ~0.5)")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must finish a request's headers this "
                                    "long after it opens or starts the request -> 408 and closed")
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections are closed after this long")
    max_connections: int | None = Field(None, ge=1, description="open connections at most; past it the longest "
                                        "idle one is closed, or the new one gets 503 + Retry-After if all are busy "
                                        "(default: 1024, lowered to fit RLIMIT_NOFILE)")
    skip_verify: bool = Field(False, description="do not check the SHA-256 of the model files against the "
                              "manifest before serving (they are checked by default; a mismatch stops the start)")
    frontends: int | None = Field(None, ge=0, description="HTTP front-end processes that parse and decode requests "
                                  "and hand the images through shared memory to this process, which owns the model "
                                  "and its batcher (0: one process does everything; default: 0 on the CPU, on a GPU "
                                  "one per two usable CPUs, 2 to 8)")
    reuse_port: bool = Field(False, description="bind the port with SO_REUSEPORT, so that several independent "
                             "ganet-serve processes can share it (the kernel spreads connections over them)")

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
