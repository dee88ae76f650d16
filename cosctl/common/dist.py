"""The process group: joining it, who this rank is, and the few collectives the trainer agrees with.

Ranks come from torchrun's (or SLURM's) environment; a process started without a launcher becomes a one-rank
group on its own, and the object collectives also work with no group at all (one process). CPU runs use gloo,
GPU runs nccl. Every function here is collective unless it says otherwise: all ranks call it, in the same
order.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from . import errors

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the group (not collective)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_world_size(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    @property
    def node(self) -> int:
        """This node's index among the job's nodes (torchrun's GROUP_RANK; 0 without a launcher)."""
        return int(os.environ.get("GROUP_RANK", "0"))


def comm_backend(device_type: str) -> str:
    """The torch.distributed backend for a device type: NCCL on CUDA, gloo everywhere else."""
    return "nccl" if device_type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_deepspeed():
    """The `deepspeed` module, imported without the `import mlflow` that its autotuner makes.

    NOTE: `deepspeed.runtime.config` imports `deepspeed.autotuning`, whose autotuner imports mlflow
    whenever it is installed: about 0.1 GiB of memory and over a second on every rank, for a tuner
    cosctl never runs. mlflow is hidden while deepspeed loads (the autotuner catches the ImportError);
    the MLflow tracker (`cosctl.train.tracking`) imports it as usual afterwards."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return importlib.import_module("deepspeed")
    sys.modules["mlflow"] = None  # an import of a module mapped to None raises ImportError
    try:
        return importlib.import_module("deepspeed")
    finally:
        del sys.modules["mlflow"]


def init_distributed() -> Dist:
    """Join (or, alone, create) the process group; idempotent within a process."""
    deepspeed = import_deepspeed()

    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if "RANK" not in os.environ:  # a single in-process rank (no launcher)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # NOTE: the CPU backend JIT-builds an inference-only shm op (~30 s of g++) on first init; skip it.
    # `import deepspeed.comm.torch` would bind torch itself, hence import_module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=comm_backend("cuda" if cuda else "cpu"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """`values` reduced element-wise over all ranks (sum, max or min), in float64."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor.tolist()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether any rank set it: decisions one rank makes alone (a time-based save, a
    signal seen by one process) must be shared, or the others wait in the save's collectives."""
    return [value > 0 for value in all_reduce([float(f) for f in flags], device, op="max")]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) when no process group is up (a command such
    as `cosctl data prepare` run alone), where the collectives below act on this process only."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(value: T, src: int = 0) -> T:
    """Rank `src`'s `value` (any picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def on_main(compute: Callable[[], T]) -> T:
    """Run `compute` on rank 0 only and give every rank its result. An exception on rank 0 is raised
    on every rank (rank 0's own; elsewhere the same user-error kind with the same message), so all
    ranks stop together instead of some waiting in a later collective for a rank that already left."""
    outcome: tuple[bool, object] = (True, None)
    problem: Exception | None = None
    if rank_and_world()[0] == 0:
        try:
            outcome = (True, compute())
        except Exception as err:  # re-raised below on every rank
            problem, outcome = err, (False, _describe(err))
    ok, value = broadcast(outcome)
    if ok:
        return value  # type: ignore[return-value]
    raise problem if problem is not None else _rebuild(*value)  # type: ignore[misc]


def barrier() -> None:
    """Wait until every rank of the process group gets here."""
    dist.barrier()


def leave_process_group() -> None:
    """Destroy this rank's process group once its last collective is done; only on success (a rank
    that failed may have peers still inside a collective, which the destroy would wait on).

    NOTE: left to interpreter teardown, gloo's worker threads can still hold work whose tensors need
    the GIL as the interpreter goes away: the rank aborts ("terminate called without an active
    exception", SIGABRT) after finishing its work, and the launcher reports the run failed
    (pytorch/pytorch#190489, #179291). Seen on a loaded 2-core machine at the end of a 2-rank eval.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather(value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def agreed(action: Callable[[], T]) -> T:
    """Run `action` on every rank; if it raises on any rank, raise the first failing rank's error on all
    of them (the same kind for user errors, the same message). A rank that failed alone would otherwise
    leave the others waiting in the next collective."""
    try:
        result, problem = action(), None
    except Exception as err:
        result, problem = None, err
    failures = [f for f in gather(None if problem is None else _describe(problem)) if f]
    if not failures:
        return result
    if problem is not None and _describe(problem) == failures[0]:
        raise problem
    raise _rebuild(*failures[0])


def _describe(err: Exception) -> tuple[str, str]:
    return type(err).__name__, str(err) or type(err).__name__


def _rebuild(kind: str, message: str) -> Exception:
    """Another rank's error here: its user-error kind when it has one, else a CheckpointError."""
    error_class = getattr(errors, kind, None)
    if isinstance(error_class, type) and issubclass(error_class, errors.UserError):
        return error_class(message)
    return errors.CheckpointError(f"{kind}: {message}" if kind not in message else message)


def on_node_main(value: T, dist_info: Dist) -> T:
    """Each rank gets the `value` of its node's local rank 0 (collective over all ranks)."""
    values = gather((dist_info.node, dist_info.local_rank, value))
    return next(v for node, local_rank, v in values if node == dist_info.node and local_rank == 0)
