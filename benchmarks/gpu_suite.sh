#!/usr/bin/env bash
# Every GPU measurement of issues 14 and 12 in one run (< 8 minutes on one H100/H200), numbers in one file.
#
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh            # writes $OUT/gpu_suite.txt
#   PY="python benchmarks/gpu_suite_dry_run.py" OUT=/tmp/dry bash benchmarks/gpu_suite.sh   # CPU: parse every step
#
# On a bare device image (no megatron-core): `bash tools/fetch_device_wheels.sh` here, carry ".whl", and the
# wheels in .whl/ are installed into /tmp/site first (skipped where megatron.core already imports).
#
# 1. tests/gpu/test_graphed_decode.py: captured decode == megatron's eager decode (float32 tokens).
# 2. The 853M / 64-row benchmark (BENCHMARKS.md), bf16: one batch vs pool (16 rows), eager vs
#    graphed, new tokens/s, ms per decode step, roofline fraction, and the bf16 log-prob mismatch
#    of the sampler vs a training forward (eager and graphed); a torch.profiler line per one-batch
#    variant (CPU and GPU ms and kernels per decode step), the top ops in $OUT/bench_853m_profile.txt.
# 3. The same model with lognormal EOS lengths (--long-tail): decode steps and time, pool vs one batch,
#    sampled at temperature 1 (the seeded sampler inside the graph; the countdown bias fixes the tokens).
# 4. Issue 12: a ~0.8B teacher (the 853M shape) beside a small student on one GPU, bf16: the teacher
#    phase, the offload copy time and their share of the step, teacher.offload off vs on (kdrl: its loss is
#    non-zero even when a random student earns no reward, so the bitwise-identity check bites).
# Each step has its own timeout and its exit status is recorded; a failed step does not stop the rest.
set -u
OUT=${OUT:-/tmp/gpu_suite}
PY=${PY:-python3}  # on the device image python3 is the interpreter that holds torch
mkdir -p "$OUT"
REPORT="$OUT/gpu_suite.txt"
MODEL="--device cuda --dtype bfloat16 --layers 16 --hidden 2048 --heads 16 --query-groups 4 --ffn 5632 --vocab 32000"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# A step killed at its timeout (SIGTERM) would lose Python's buffered output to its log file.
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null && ! python3 -c "import megatron.core" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  echo "# gpu_suite $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'mcore', m.__version__)" 2>&1 | tail -n 1
  [ -f "$OUT/wheels.log" ] && tail -n 3 "$OUT/wheels.log"
} > "$REPORT"

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo -e "\n## $name\n\$ $*" >> "$REPORT"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E "Warning: |warnings\.warn\(" "$OUT/$name.log" | tail -n 40 >> "$REPORT"
  echo "[$name: rc=$rc, $((SECONDS - start)) s]" >> "$REPORT"
}

step graphed_test 120 $PY -m pytest -q -x tests/gpu/test_graphed_decode.py
# shellcheck disable=SC2086
step bench_853m 210 $PY benchmarks/bench_generate.py $MODEL --batch 64 --max-rows 16 --prompt-len 128 \
  --new-tokens 256 --mismatch --profile 128 --profile-out "$OUT/bench_853m_profile.txt"
# shellcheck disable=SC2086
step bench_853m_long_tail 150 $PY benchmarks/bench_generate.py $MODEL --batch 64 --max-rows 16 --prompt-len 128 \
  --new-tokens 256 --long-tail --temperature 1
TEACHER="--teacher.model.num_layers=16 --teacher.model.hidden_size=2048 --teacher.model.num_attention_heads=16 \
  --teacher.model.num_query_groups=4 --teacher.model.ffn_hidden_size=5632 --teacher.model.params_dtype=bfloat16 \
  --teacher.model.max_position_embeddings=512 --teacher.parallel.tensor_model_parallel_size=1"
STUDENT="--student.model.num_layers=4 --student.model.hidden_size=1024 --student.model.num_attention_heads=8 \
  --student.model.num_query_groups=4 --student.model.ffn_hidden_size=2816 --student.model.params_dtype=bfloat16 \
  --student.model.max_position_embeddings=512 --student.parallel.tensor_model_parallel_size=1"
# shellcheck disable=SC2086
step teacher_phase 100 $PY benchmarks/bench_teacher_phase.py --config launch/configs/tiny_cpu.yaml --steps 4 \
  --student.load=null --teacher.load=null --train.device=cuda $TEACHER $STUDENT --rl.prompts_per_step=16 \
  --rl.group_size=8 --rl.max_new_tokens=256 --rl.mini_batch_size=64 --rl.micro_batch_size=16 --distill.objective=kdrl
echo "done: $REPORT"
