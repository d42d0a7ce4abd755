"""Check that a launch works: every rank joins the world and a gloo/NCCL all_reduce gives the right sum.

    NNODES=2 RDZV_ENDPOINT=node0:29500 CONFIG= ENTRY=tools/dist_check.py launch/torchrun.sh
    CONFIG= ENTRY=tools/dist_check.py sbatch --nodes=2 launch/slurm.sbatch

Each rank contributes a tensor filled with (rank + 1); after the sum every element must equal
world * (world + 1) / 2. Prints one line per rank and exits 1 on a wrong result.
"""

from __future__ import annotations

import argparse
import socket
import sys

import torch
import torch.distributed as dist

from rlad_megatron.distributed import init_distributed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--numel", type=int, default=1024, help="elements in the all-reduced tensor")
    args = parser.parse_args(argv)

    world = init_distributed(args.device)
    x_N = torch.full((args.numel,), float(world.rank + 1), device=world.device)
    dist.all_reduce(x_N)
    expected = world.world_size * (world.world_size + 1) / 2
    ok = bool(torch.all(x_N == expected))
    print(f"dist_check rank={world.rank} world={world.world_size} local_rank={world.local_rank} "
          f"host={socket.gethostname()} backend={world.backend} all_reduce={x_N[0].item():g} "
          f"expected={expected:g} {'OK' if ok else 'MISMATCH'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
