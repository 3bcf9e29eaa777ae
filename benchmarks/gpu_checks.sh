#!/bin/bash
# Everything that needs a CUDA GPU, in one bounded run: the gpu-marked tests, then the GPU benchmarks.
# Each step has its own time limit, and a failing step does not stop the others. Results go to $OUT
# (default ./gpu_results): pytest_gpu.txt, serve_gpu.{txt,json}, train_gpu.{txt,json}, estimate.{txt,json}.
#
#     bash benchmarks/gpu_checks.sh            # on a GPU host, from the repository root, after pip install -e .
#
# On an H100 (docs/serving.md, docs/training.md) the steps other than the tests took about 2 minutes; the tests'
# --compile case had not finished compiling after 3 minutes, hence the tests' 7-minute limit.
set -u
OUT=$(realpath -m "${OUT:-gpu_results}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/env.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    >> "$OUT/env.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, report the exit status
    local name=$1 limit=$2; shift 2
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name exit $?" | tee -a "$OUT/$name.txt"
}

step pytest_gpu 420 python3 -m pytest -m gpu -q -rs -s -p no:cacheprovider \
    tests/test_serve_gpu.py tests/test_train_recipes.py tests/test_export_trt_triton.py
cd benchmarks
step serve_gpu 180 python3 bench_serve.py --servers ours,torch,torch_async --torch-device cuda \
    --serve-arg=--backend=torch --serve-arg=--device=cuda --duration 6 --warmup 2 --rounds 1 --no-open-loop \
    --output "$OUT/serve_gpu.json"
step train_gpu 120 python3 bench_train_throughput.py --device cuda --steps 40 --rounds 3 \
    --output "$OUT/train_gpu.json"
step estimate 90 python3 estimate_cifar100_gpu.py --measure-gpu --steps 3 --output "$OUT/estimate.json"

# ---- frontends: which process layout serves the GPU best (docs/serving.md, "Process layouts"). ganet-serve with
# the torch backend on CUDA as one process, as --frontends 2/4/8 (N HTTP processes feeding one model owner through
# shared memory), and as 2 independent instances sharing the port (--reuse-port); 128 clients from 4 generator
# processes. Results: $OUT/frontends.{txt,json} (images/s, p50/p99, CPU ms per image, owner/front-end split).
step frontends 180 python3 bench_serve.py --servers ours_single,ours_fe2,ours_fe4,ours_fe8,ours_reuse2 \
    --serve-arg=--backend=torch --serve-arg=--device=cuda --clients 128 --generators 4 --duration 6 --warmup 2 \
    --rounds 1 --no-open-loop --output "$OUT/frontends.json"
