#!/bin/bash
# Everything about serving that needs a CUDA GPU, in one bounded run (<= 8 minutes with set-up): the gpu-marked
# serving tests (CUDA graphs vs eager, fp16/bf16 vs fp32, nvJPEG vs Pillow, TensorRT where installed), model-only
# throughput, GPU decoding throughput, and end-to-end HTTP throughput with --decode cpu and --decode gpu. Each step
# has its own time limit (interrupted with SIGINT, so benchmarks stop their servers), and a failing step does not
# stop the others. Results go to $OUT (default ./gpu_results), seven files:
#   log.txt                 every step's output, with its exit status and seconds (pytest prints the figures)
#   summary.json            each target against its measured value (also the last lines of log.txt), and the
#                           parity/agreement figures the tests recorded
#   model.json              bench_gpu_model.py: images/s at batch 1/8/64/256, eager vs CUDA graph, fp32/fp16/bf16
#   decode.json             bench_gpu_decode.py: decode + resize images/s, CPU thread vs nvJPEG batches
#   serve_decode_cpu.json   bench_serve.py: torch backend, fp16, CUDA graphs, --decode cpu, 64/128/256 clients,
#   serve_decode_gpu.json   ... and --decode gpu: images/s, p50/p99, server CPU ms per image, GPU utilisation (NVML),
#                           generator cores, open loop at half the peak
#   frontends.json          bench_serve.py: the process layouts (one process, --frontends 4, 2 x --reuse-port) at
#                           128 clients, which decides the GPU default (docs/serving.md, "Process layouts")
#
#     bash benchmarks/gpu_wheels.sh                 # here, once: the wheels the GPU host lacks -> .whl/
#     bash benchmarks/gpu_checks.sh                 # on the GPU host, from the repository root, with .whl/ beside it
#     GPU_CHECKS_DRY=1 bash benchmarks/gpu_checks.sh   # on a CPU machine: every step, tiny, to see each starts and
#                                                      # writes its file (no number in it means anything)
#     GPU_CHECKS_TRAIN=1 bash benchmarks/gpu_checks.sh # also the training GPU tests and benchmarks (train.json,
#                                                      # estimate.json; up to 10 more minutes: past the budget)
#
# The end-to-end load generator runs on the same host: bench_serve.py's asyncio client over raw sockets, in 4
# processes; the cores it took are in serve_decode_*.json (generator_cores).
set -u
OUT=$(realpath -m "${OUT:-gpu_results}")
DRY=${GPU_CHECKS_DRY:-0}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1 GANET_GPU_FIGURES="$OUT/figures.jsonl"
rm -f "$GANET_GPU_FIGURES"
T0=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, report exit status and seconds
    local name=$1 limit=$2; shift 2
    local start=$(date +%s)
    echo "== $name (at most ${limit} s, at $(( start - T0 )) s)" | tee -a "$LOG"
    timeout -s INT -k 15 "$limit" "$@" >> "$LOG" 2>&1
    local status=$?
    echo "== $name exit $status in $(( $(date +%s) - start )) s" | tee -a "$LOG"
}

setup() {
    if [ "$DRY" != 1 ] && ls .whl/*.whl > /dev/null 2>&1; then  # cp312 wheels: the GPU host's Python
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ganet-site \
            .whl/*.whl || return 1
    fi
    python3 -c "import ganet.serve.app" 2> /dev/null \
        || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || return 1
    { nvidia-smi --query-gpu=name,driver_version,memory.total,utilization.gpu --format=csv 2>&1 || true
      python3 -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
      lscpu | grep -E '^(Model name|CPU\(s\))'; } 2>&1
}
[ "$DRY" != 1 ] && export PYTHONPATH=/tmp/ganet-site${PYTHONPATH:+:$PYTHONPATH}
export DRY
export -f setup
step setup 45 bash -c setup

# The serving tests that need CUDA (in a dry run they skip: only their collection is checked).
step pytest_gpu 150 python3 -m pytest -m gpu -q -rs -s -p no:cacheprovider tests/test_serve_gpu.py \
    tests/test_serve_gpu_graphs.py tests/test_gpu_decode.py tests/test_export_trt_triton.py

if [ "$DRY" = 1 ]; then
    MODEL=(--device cpu --model ga_shufflenet_v2_cifar --batches 1,8 --precisions fp32,bf16 --rounds 2 --seconds 0.1)
    DECODE=(--device cpu --batches 4 --rounds 1 --seconds 0.2)
    SERVE=(--clients 2,4 --generator-processes 2 --duration 1 --warmup 1 --rounds 1 --serve-arg=--device=cpu
           --serve-arg=--max-batch=8 --serve-arg=--precision=bf16)
    LAYOUTS=(--clients 4 --generator-processes 2 --duration 1 --warmup 1 --rounds 1 --no-open-loop
             --serve-arg=--device=cpu --serve-arg=--max-batch=8)
else
    MODEL=()
    DECODE=()
    SERVE=(--clients 64,128,256 --generator-processes 4 --duration 3 --warmup 1.5 --rounds 2
           --serve-arg=--device=cuda --serve-arg=--max-batch=256 --serve-arg=--precision=fp16)
    LAYOUTS=(--clients 128 --generator-processes 4 --duration 3 --warmup 1.5 --rounds 1 --no-open-loop
             --serve-arg=--device=cuda --serve-arg=--max-batch=256 --serve-arg=--precision=fp16)
fi
cd benchmarks
step model 100 python3 bench_gpu_model.py "${MODEL[@]}" --output "$OUT/model.json"
step decode 30 python3 bench_gpu_decode.py "${DECODE[@]}" --output "$OUT/decode.json"
for decode in cpu gpu; do
    step "serve_decode_$decode" 75 python3 bench_serve.py --servers ours --checkpoint-only "${SERVE[@]}" \
        --serve-arg=--backend=torch --serve-arg=--decode=$decode --output "$OUT/serve_decode_$decode.json"
done
# Which process layout serves the GPU best (docs/serving.md, "Process layouts"): ganet-serve with the torch backend
# on CUDA as one process, as --frontends 4 (HTTP processes feeding one model owner through shared memory) and as 2
# independent instances sharing the port (--reuse-port), 128 clients from 4 generator processes.
step frontends 60 python3 bench_serve.py --servers ours_single,ours_fe4,ours_reuse2 --checkpoint-only \
    "${LAYOUTS[@]}" --serve-arg=--backend=torch --output "$OUT/frontends.json"
if [ "${GPU_CHECKS_TRAIN:-0}" = 1 ]; then  # the training side, as this script ran it before serving grew
    step pytest_train_gpu 420 python3 -m pytest -m gpu -q -rs -s -p no:cacheprovider ../tests/test_train_recipes.py
    step train_gpu 120 python3 bench_train_throughput.py --device cuda --steps 40 --rounds 3 --output "$OUT/train.json"
    step estimate 90 python3 estimate_cifar100_gpu.py --measure-gpu --steps 3 --output "$OUT/estimate.json"
fi
cd ..
step summary 20 python3 benchmarks/gpu_summary.py "$OUT"
rm -f "$GANET_GPU_FIGURES"  # its figures are in summary.json: $OUT stays within the 8 files a device run returns
tail -n 14 "$LOG"
echo "gpu_checks: $(( $(date +%s) - T0 )) s in all; results in $OUT"
