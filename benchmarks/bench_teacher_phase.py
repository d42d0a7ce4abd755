"""The teacher phase's share of an RL step, with ``teacher.offload`` off and on, side by side in one run.

    python benchmarks/bench_teacher_phase.py --config launch/configs/tiny_cpu.yaml --steps 4 \\
        --student.load=null --teacher.load=null [--section.key=value ...]

One process builds the trainer twice from the same config (offload off, then on) and runs
``--steps`` steps of each; the first step of each is a warm-up and not counted. Reports the median
step time, the teacher phase (``time/teacher_s``: teacher, reference and the policy's mismatch
forward), the offload copy time within it (``time/offload_s``) and their shares of the step, and
checks that both runs give the same losses (offload must not change a bit). benchmarks/gpu_suite.sh
runs it with a ~1B teacher on one GPU.
"""

from __future__ import annotations

import statistics
import sys


def _run(config: str, overrides: list[str], steps: int) -> tuple[list[dict], list[float]]:
    from rlad_megatron.config import load_config
    from rlad_megatron.distributed import destroy_model_parallel, init_distributed
    from rlad_megatron.trainer import Trainer

    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, init_distributed(cfg.train.device))
    rows = []
    for _ in range(steps):
        rows.append(trainer.train_step())
        trainer.step += 1
    destroy_model_parallel()
    return rows[1:], [r["loss"] for r in rows]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        print(__doc__.strip())
        return 2
    i = argv.index("--config")
    config = argv[i + 1]
    del argv[i:i + 2]
    steps = 4
    if "--steps" in argv:
        i = argv.index("--steps")
        steps = int(argv[i + 1])
        del argv[i:i + 2]
    base = argv + ["--logging.tensorboard=false", "--logging.progress_bar=false", "--checkpoint.save_interval=0",
                   "--train.eval_interval=0", f"--train.steps={steps}"]
    results, losses = {}, {}
    for offload in (False, True):
        rows, losses[offload] = _run(config, base + [f"--teacher.offload={'true' if offload else 'false'}",
                                                     "--logging.run_dir=runs/bench_teacher_phase"], steps)
        results[offload] = {k: statistics.median(r[k] for r in rows)
                            for k in ("time/step_s", "time/teacher_s", "time/offload_s", "time/train_s",
                                      "time/rollout_s")}
    print(f"{'teacher.offload':>16} {'step_s':>8} {'rollout_s':>9} {'teacher_s':>9} {'offload_s':>9} {'train_s':>8} "
          f"{'teacher share':>13} {'copy share':>10}")
    for offload, m in results.items():
        step = m["time/step_s"]
        print(f"{str(offload).lower():>16} {step:8.3f} {m['time/rollout_s']:9.3f} {m['time/teacher_s']:9.3f} "
              f"{m['time/offload_s']:9.3f} {m['time/train_s']:8.3f} {m['time/teacher_s'] / step:13.1%} "
              f"{m['time/offload_s'] / step:10.1%}")
    same = losses[False] == losses[True]
    print(f"losses with offload off and on: {'identical' if same else 'DIFFERENT'} ({losses[False]})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
