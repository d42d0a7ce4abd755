"""RLAD training entry point: parse -> init distributed -> build -> run.

    torchrun --nproc-per-node 2 -m rlad_megatron.train --config launch/configs/tiny_cpu.yaml [--rl.group_size=8 ...]

Any config key can be overridden as ``--section.key=value``; ``--resume`` is short for
``--checkpoint.resume=true``.
"""

from __future__ import annotations

import argparse
import sys

from rlad_megatron.config import ConfigError, check_world, load_config_or_exit


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m rlad_megatron.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see launch/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.resume:
        overrides.append("--checkpoint.resume=true")
    cfg = load_config_or_exit(args.config, overrides)
    # Heavy imports after the config is known to be valid: --help and bad configs answer fast.
    from rlad_megatron.distributed import init_distributed
    from rlad_megatron.distributed.init import world_from_env
    from rlad_megatron.trainer import run

    try:
        # Both layouts against the launcher's world size, before any process group exists.
        check_world(cfg, world_from_env()[1])
    except ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    world = init_distributed(cfg.train.device)
    run(cfg, world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
