#!/usr/bin/env bash
# The embedded default on a laptop-sized CPU machine:
#   1. SFT a tiny teacher (well) and a tiny student (briefly) on 2-digit arithmetic; cached in runs/tiny/sft/.
#   2. RLAD: the student trains with GRPO + the TRRD ratio to the teacher, TP=2 on 2 gloo ranks.
# Extra arguments are config overrides for step 2, e.g. --distill.objective=grpo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-launch/configs/tiny_cpu.yaml}
SFT_DIR=${SFT_DIR:-runs/tiny/sft}
TEACHER_STEPS=${TEACHER_STEPS:-1200}
STUDENT_STEPS=${STUDENT_STEPS:-1000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f "$SFT_DIR/teacher/megatron_config.yaml" ] ||
  "$PY" tools/sft.py --config "$CONFIG" --model teacher --steps "$TEACHER_STEPS" --out "$SFT_DIR/teacher"
[ -f "$SFT_DIR/student/megatron_config.yaml" ] ||
  "$PY" tools/sft.py --config "$CONFIG" --model student --steps "$STUDENT_STEPS" --out "$SFT_DIR/student"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m rlad_megatron.train --config "$CONFIG" \
  --student.load="$SFT_DIR/student" --teacher.load="$SFT_DIR/teacher" "$@"
