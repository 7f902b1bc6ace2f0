"""Two ranks see one checkpoint root differently (rank 1's view of the shared file system lacks a shard of the
newest checkpoint): :func:`megatron_pz.checkpoint_integrity.agree_on_resume` gives both the newest checkpoint
every rank finds complete, and rank 0 learns which rank skipped what.

argv: a checkpoint root with complete iter_0000001 and iter_0000002.
"""

import sys
from pathlib import Path

import torch.distributed as dist

from megatron_pz import checkpoint_integrity


def main() -> None:
    root = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert checkpoint_integrity.find_resume(root).path == root / "iter_0000002"  # complete as both see it now
    real = checkpoint_integrity.problems
    if rank == 1:  # this rank's view only (a file not visible on its node)
        checkpoint_integrity.problems = lambda p: (["shard __0_1.distcp missing"] if p.name == "iter_0000002"
                                                   else real(p))
    point = checkpoint_integrity.agree_on_resume(root)
    assert point.path == root / "iter_0000001", (rank, point)
    if rank == 0:
        assert point.skipped == [(root / "iter_0000002", "on rank 1: shard __0_1.distcp missing")], point.skipped
        print("AGREED", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
