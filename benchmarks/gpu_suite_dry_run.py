"""Check every command of benchmarks/gpu_suite.sh on a machine without a GPU, running none of them.

    PY="python benchmarks/gpu_suite_dry_run.py" OUT=/tmp/dry bash benchmarks/gpu_suite.sh

The suite calls ``$PY`` for each step; with this script as ``$PY`` each step parses its own command
line instead of running it: pytest targets must exist, ``bench_generate.py`` arguments must pass its
parser (and ``--profile-out`` must name a file in an existing folder), ``bench_teacher_phase.py``
overrides must load as a config whose layouts fit one process (an unknown or mistyped key is an
error, as in a real run). Exit 0 and one line on
success, 2 and the reason otherwise, so the suite's report shows ``rc=0`` per step. A GPU lent for
a few minutes is then not spent on a typo.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(argv: list[str]) -> str:
    """What was checked, or raises SystemExit / ValueError with the reason."""
    if argv[:1] == ["-c"]:
        return "inline python: not run"
    if argv[:2] == ["-m", "pytest"]:
        targets = [a for a in argv[2:] if not a.startswith("-")]
        missing = [t for t in targets if not (ROOT / t.split("::")[0]).exists()]
        if not targets or missing:
            raise ValueError(f"pytest: expected existing test files, got {targets} (missing: {missing})")
        return f"pytest targets exist: {' '.join(targets)}"
    script, args = Path(argv[0]).name, argv[1:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if script == "bench_generate.py":
        import bench_generate

        parsed = bench_generate.parse_args(args)
        if parsed.profile_out and not Path(parsed.profile_out).parent.is_dir():
            raise ValueError(f"--profile-out: expected a file in an existing folder, got {parsed.profile_out}")
        return f"bench_generate arguments parse ({len(args)} tokens)"
    if script == "bench_teacher_phase.py":
        from rlad_megatron.config import check_world, load_config

        i = args.index("--config")
        config, overrides = args[i + 1], args[:i] + args[i + 2:]
        if "--steps" in overrides:
            j = overrides.index("--steps")
            int(overrides[j + 1])
            del overrides[j:j + 2]
        check_world(load_config(ROOT / config, overrides), 1)  # the suite runs it as one process
        return f"bench_teacher_phase config loads for one process ({len(overrides)} overrides)"
    raise ValueError(f"command: expected pytest, bench_generate.py or bench_teacher_phase.py, got {argv[:1]}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        print(f"dry run: {check(argv)}")
    except (ValueError, SystemExit) as e:  # argparse exits with its own message on stderr
        print(f"dry run: FAILED: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
