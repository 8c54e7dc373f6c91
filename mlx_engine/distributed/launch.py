"""A command's place in a model-parallel job: join it, and let rank 0 alone speak.

Under `mlx.launch` (or MLX_RANK and MLX_HOSTFILE set by hand) every rank runs the same
command: each loads its part of the model and runs the same forward passes in lockstep, so
every rank would print the same text. Rank 0 prints; the others write nothing unless they
fail, when their own stderr says which rank failed before the command's error line (a
silent rank that died would otherwise leave no word of why).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator


def join_job() -> Any:
    """The job's global group (size 1 outside a distributed job)."""
    import mlx.core as mx

    return mx.distributed.init()


@contextlib.contextmanager
def rank_0_speaks(group: Any = None) -> Iterator[int]:
    """Within the block, ranks > 0 write nothing to stdout or stderr unless the block raises; yields the rank."""
    group = group if group is not None else join_job()
    rank = group.rank()
    if rank == 0:
        yield 0
        return
    with open(os.devnull, "w") as devnull:
        try:
            with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
                yield rank
        except BaseException:
            print(f"rank {rank} of {group.size()} failed:", file=sys.stderr)  # the real stderr again
            raise
