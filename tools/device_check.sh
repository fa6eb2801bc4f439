#!/usr/bin/env bash
# The checks only an accelerator can run, in one go of under 8 minutes, for the day a GPU or
# TPU machine is lent (the device tool: `status`, then `run` this with a ~9 min timeout):
#   bash tools/device_check.sh
# JSON lines on stdout and in $OUT/device_check.jsonl ($OUT: the device tool's output folder):
# 1. the device JAX sees, and the smoke stage: a Qwen2.5-0.5B-shaped model, random init, bf16,
#    sharded over every chip, one forward;
# 2. the sampler benchmark and the GRPO iteration benchmark on a random 0.5B-shaped model in
#    bf16 (decode tokens/s; the update's FLOP/s against the matmul peak measured in the run);
# 3. the attention kernels' parity tests (on a GPU: cuDNN and the Pallas kernel; on a TPU: splash
#    and the decode kernel), compiled for the device, not interpreted.
# Each step has its own time limit; a step that fails or times out is reported and the next
# one runs. Needs r1jax and a jax with the accelerator's plugin installed where it runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
log="$out/device_check.jsonl"
: > "$log"
python=${PYTHON:-python}

step() {  # step NAME LIMIT_S CMD...: run it, keep its log, report its last JSON line
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  grep -h '^{' "$out/$name.log" | tail -n 1 >> "$log"
  echo "{\"check\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$log"
  tail -n 2 "$log"
}

unset JAX_PLATFORMS XLA_FLAGS
step device 60 "$python" -c 'import jax, json; d = jax.devices(); print(json.dumps({
    "backend": jax.default_backend(), "devices": len(d), "kind": d[0].device_kind}))'
step smoke 120 "$python" -m r1jax.main --config=experiments/pretrained.py:model=qwen2.5-0.5b \
    --workdir="$out/smoke"
step sampler 150 "$python" tools/bench_sampler.py --make_random=qwen2.5-0.5b \
    --hf_dir="$out/q05b" --dtype=bfloat16 --prompts=16 --group=8 --new_tokens=256 --repeats=3
step grpo 150 "$python" tools/bench_grpo.py --make_random=qwen2.5-0.5b --hf_dir="$out/q05b" \
    --dtype=bfloat16 --prompts=8 --group=8 --completion=256 --iters=3
# The kernel named for this platform runs compiled; the other one interpreted.
platform=$("$python" -c 'import jax; print(jax.default_backend())' 2>/dev/null)
step kernels 120 env JAX_PLATFORMS="$platform" "$python" -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py -k "matches_xla or bf16"
echo "device check: $log"
