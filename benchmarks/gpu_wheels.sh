#!/bin/bash
# Download the wheels benchmarks/gpu_checks.sh installs on a GPU host that has no package index: the serving stack
# that host lacks (its image has torch, torchvision, onnx, onnxruntime, numpy, Pillow, scikit-learn/-image, httpx,
# anyio, h11, click, uvloop, nvidia-ml-py, but no FastAPI, Starlette, uvicorn, pydantic, pydantic-settings,
# python-multipart, httptools or opentelemetry-api), for CPython 3.12 on x86-64 Linux. The versions are the ones this project is
# tested with here; --no-deps, so every package the stack needs that the host lacks is named below.
#
#     bash benchmarks/gpu_wheels.sh            # -> .whl/ (ignored by git); then carry `.whl` to the GPU host
#
# About 5 MB in all.
set -euo pipefail
DEST=${1:-.whl}
WHEELS=(
    fastapi==0.165.0
    starlette==1.10.0
    annotated-doc==0.0.7
    pydantic==2.13.4
    pydantic-core==2.46.4
    pydantic-settings==2.14.1
    python-dotenv==1.2.2
    annotated-types==0.7.0
    typing-inspection==0.4.2
    typing-extensions==4.16.0
    python-multipart==0.0.34
    uvicorn==0.55.0
    httptools==0.9.0
    prometheus-client==0.26.0
    opentelemetry-api==1.45.2  # fastapi imports it
)
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
echo "wrote $(ls "$DEST"/*.whl | wc -l) wheels to $DEST ($(du -sh "$DEST" | cut -f1)); carry it to the GPU host" \
     "and run: bash benchmarks/gpu_checks.sh"
