#!/usr/bin/env bash
# The embedded default on a laptop-sized CPU machine (about 4 minutes on 2 cores):
#   1. SFT a tiny teacher on 2-digit additions with and without carries, and a tiny student on
#      additions without carries (and 3% with them); cached in runs/tiny/sft_carry/.
#   2. RLAD: the student trains on fresh carry problems with GRPO + the TRRD ratio to the teacher,
#      TP=2 on 2 gloo ranks, and is evaluated greedily on 500 held-out carry problems.
# Extra arguments are config overrides for step 2, e.g. --distill.objective=grpo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-launch/configs/tiny_cpu.yaml}
SFT_DIR=${SFT_DIR:-runs/tiny/sft_carry}
TASK_DIR=${TASK_DIR:-data/tiny_arith/carry}
TEACHER_STEPS=${TEACHER_STEPS:-1200}
STUDENT_STEPS=${STUDENT_STEPS:-2000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f "$SFT_DIR/teacher/megatron_config.yaml" ] ||
  "$PY" tools/sft.py --config "$CONFIG" --model teacher --steps "$TEACHER_STEPS" --out "$SFT_DIR/teacher" \
    --data.train_path="$TASK_DIR/sft_teacher.jsonl"
[ -f "$SFT_DIR/student/megatron_config.yaml" ] ||
  "$PY" tools/sft.py --config "$CONFIG" --model student --steps "$STUDENT_STEPS" --out "$SFT_DIR/student" \
    --data.train_path="$TASK_DIR/sft_student.jsonl"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m rlad_megatron.train --config "$CONFIG" \
  --student.load="$SFT_DIR/student" --teacher.load="$SFT_DIR/teacher" "$@"
