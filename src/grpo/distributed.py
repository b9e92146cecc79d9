"""Several processes under torchrun: the process group, which groups a rank holds, and global reductions.

`torchrun --nproc_per_node N -m grpo train CONFIG` (or `grpo train --nproc N`) starts N copies of the same
run; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) says who each one is, on one
node or many. Each rank samples and scores its own whole groups (a group never spans ranks, so advantages
stay local, but for scale_rewards "batch"'s std, of every rank's rewards); the loss normalizers, the guard's
decisions and the metrics are reduced over all ranks; DDP or FSDP2 (grpo.parallel) sums the gradients. gloo on
CPU, NCCL on CUDA.

Every rank runs the same collectives in the same order whatever its data: a count that depends on a rank's own
data (micro-batches, dynamic sampling's groups) is agreed first (`max`, `gather`).

Every collective runs inside `World.during(phase)`: when one fails (a rank died, or none answered within
trainer.dist_timeout_s) the error names this rank and the phase instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class DistributedError(RuntimeError):
    """A collective failed or timed out; the message names the rank and the phase."""


@dataclass
class World:
    """This process's place among the run's processes (one process: rank 0 of 1, no collectives)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout_s: float = 1800.0
    device: torch.device = torch.device("cpu")  # where collective tensors live (cuda for NCCL)
    phase: str = "start"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, count: int) -> slice:
        """This rank's part of `count` items (groups) split evenly: rank r holds [r * count / W, (r + 1) * count / W)."""
        if count % self.size:
            raise ValueError(f"{count} groups do not split evenly over {self.size} ranks")
        per = count // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    @contextmanager
    def during(self, phase: str):
        """Name the phase the next collectives belong to (for the timeout's message)."""
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    def _run(self, fn):
        try:
            return fn()
        except (RuntimeError, ValueError) as e:  # gloo / NCCL report a dead peer or a timeout as RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.size}: stopped during {self.phase}: another rank failed or did not answer "
                f"within trainer.dist_timeout_s={self.timeout_s:g} s ({first[:200]})"
            ) from None

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._run(lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        return t.cpu().tolist()

    def max(self, values: list[int]) -> list[int]:
        """Element-wise maxima over all ranks (counts every rank must agree on, such as forward passes)."""
        if not self.distributed:
            return [int(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        self._run(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return [int(v) for v in t.cpu().tolist()]

    def any(self, flag: bool) -> bool:
        """Whether any rank says True."""
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        self._run(lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        self._run(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (a sum of nothing: it times out like any other collective)."""
        self.sum([0.0])


SINGLE = World()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device_type: str, timeout_s: float) -> World:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); one process: SINGLE's like."""
    if not launched():
        return World(timeout_s=timeout_s)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, timeout_s, device)


def close_world(world: World, finished: bool = False) -> None:
    """Leave the process group, collecting unreachable objects first (those in reference cycles may still hold
    the group, a wrapped model say).

    After a finished run (`finished`: every rank got here without an error) the ranks first meet at a barrier,
    which waits with the GIL released. gloo's worker threads let go of a collective's tensors after the caller
    has its result, and a tensor made in Python needs the GIL for that; a worker that got there once the
    interpreter had begun to shut down (DDP's reducer keeps the process group and its threads alive past
    destroy_process_group) ended the process with "terminate called without an active exception" (SIGABRT,
    ~1 finished 2-rank run in 30). At the barrier, after every rank's last collective, such a worker gets the
    GIL; gloo also destroys a finished collective under the lock the barrier takes first. Not after an error:
    a rank that failed leaves at once rather than wait for ranks still inside another collective."""
    if world.distributed:
        import gc

        import torch.distributed as dist

        if dist.is_initialized():
            gc.collect()
            try:
                if finished:
                    with world.during("the run's end"):
                        world._run(dist.barrier)
            finally:
                dist.destroy_process_group()
