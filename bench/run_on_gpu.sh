#!/usr/bin/env bash
# Run the GPU suite and benchmarks on the GPU machine:
#   bash bench/run_on_gpu.sh --tests [PYTEST ARGS...]   the GPU suite (tests/gpu + the README's example on CUDA) in
#                                                      GPU_SUITE_SHARDS (4) pytest processes at once, log in
#                                                      bench/results/gpu_suite.log
#   bash bench/run_on_gpu.sh NAME [NAME...]             bench/NAME.py each, writing bench/results/NAME.json
# Installs the carried wheels (.whl/: diffusers, transformers, grpcio, protobuf... that the machine lacks or has
# too old; build/quant_whl/: bitsandbytes and torchao, where carried) into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls build/quant_whl/*.whl 2>/dev/null) \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -c 'import torch, diffusers, transformers, grpc; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "diffusers", diffusers.__version__,
  "transformers", transformers.__version__, "grpcio", grpc.__version__)'
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv,noheader || true
mkdir -p bench/results
if [ "${1:-}" = "--tests" ]; then
  shift
  log=bench/results/gpu_suite.log
  # The device's checkout may carry an older commit under a newer working tree: the count says whether it does.
  { date -u; git log -1 --format='commit %H %s' 2>/dev/null || true
    echo "working tree: $(git status --porcelain 2>/dev/null | wc -l) paths differ from that commit"; } > "$log"
  [ -n "${OUT:-}" ] && cp "$log" "$OUT/gpu_suite.log"  # the log comes back even if the run is cut short
  # GPU_SUITE_SHARDS pytest processes side by side (each in-process server of the suite starts a model worker
  # process, which imports torch and diffusers: alone, the suite would outlast a 10-minute device call). A test still
  # running after 200 s gets every thread's stack in the log (pytest's faulthandler), so a hang says where.
  shards=${GPU_SUITE_SHARDS:-4}
  pids=()
  part=${OUT:-/tmp}  # under $OUT each shard's log comes back even if the call is cut short
  for i in $(seq 1 "$shards"); do
    OMP_NUM_THREADS=$(( $(nproc) / shards > 0 ? $(nproc) / shards : 1 )) python3 -m pytest -p no:cacheprovider -q -rA \
      -o faulthandler_timeout=200 --basetemp "/tmp/gpu-suite-$i" --shard "$i/$shards" \
      tests/test_node.py::test_the_readme_python_example_runs_as_written tests/gpu "$@" \
      > "$part/gpu_suite_shard_$i.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for i in $(seq 1 "$shards"); do
    wait "${pids[$((i - 1))]}" || status=1
    { echo "=== shard $i/$shards"; cat "$part/gpu_suite_shard_$i.log"; } >> "$log"
  done
  [ -n "${OUT:-}" ] && cp "$log" "$OUT/gpu_suite.log"
  tail -n 3 "$part"/gpu_suite_shard_*.log
  exit "$status"
fi
status=0
for name in "$@"; do
  echo "=== $name"
  # Results are written under $OUT as they are made, so a run cut short still returns what it measured.
  python3 "bench/$name.py" --out "${OUT:-bench/results}/$name.json" ${BENCH_ARGS:-} 2>&1 | tee "${OUT:-/tmp}/$name.log" \
    || status=1
done
exit $status
