#!/usr/bin/env bash
# What a session runs where a CUDA device is lent (CI has none): the CUDA tests, then the strong-zero and
# trace benchmarks on the device, a profile of the strong-zero backward on the attention block, and the
# compile benchmark. Logs and JSON go to $OUT (default /tmp/gradwise-device).
#
#     bash benchmarks/device_check.sh
set -u
out=${OUT:-/tmp/gradwise-device}
mkdir -p "$out"
export PYTHONPATH=$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1
python3 -c "import torch, gradwise; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py 2>&1 | tee "$out/tests.log" | tail -25
timeout 150 python3 benchmarks/bench_strong_zeros.py --device cuda --repeats 21 --json "$out/strong.json" 2>&1 \
    | grep -v USDT | tee "$out/strong.log"
timeout 100 python3 benchmarks/bench_trace.py --device cuda --repeats 11 2>&1 | tee "$out/trace.log"
timeout 60 python3 benchmarks/profile_backward.py --device cuda --only "SDPA block causal" 2>&1 | tee "$out/profile.log" \
    | head -60
timeout 200 python3 benchmarks/bench_compile.py --device cuda --repeats 11 --json "$out/compile.json" 2>&1 \
    | tee "$out/compile.log" | tail -20
