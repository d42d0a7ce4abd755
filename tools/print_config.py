"""Resolve and validate a config without starting any process group.

    python tools/print_config.py launch/configs/tiny_cpu.yaml [--section.key=value ...]

Prints the resolved YAML; exits 1 with a one-line message naming the field on bad input.
"""

from __future__ import annotations

import sys

from rlad_megatron.config import load_config_or_exit, to_yaml


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cfg = load_config_or_exit(argv[0], argv[1:], exit_code=1)
    print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
