"""Process-group setup from torchrun's environment, and full (unsharded) state dicts for saving."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from qattune.errors import QattuneError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def default_device() -> torch.device:
    """cuda when present, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(device: str) -> torch.device:
    """`device` (cpu, cuda, cuda:1, mps, ...) as a torch.device; one line if torch does not know it, or if it
    names CUDA and no GPU is visible."""
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise QattuneError(f"device={device} is not a device torch knows ({str(err).splitlines()[0]}); "
                           "use cpu, cuda, cuda:N or mps") from err
    if target.type == "cuda" and not torch.cuda.is_available():
        raise QattuneError(f"device '{device}' was requested but no CUDA GPU is visible; set device=cpu")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise QattuneError(f"device={device}: this machine shows {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                           "pick one of those (CUDA_VISIBLE_DEVICES renumbers them from 0)")
    return target


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun described (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR...), with
    NCCL on CUDA and gloo on CPU; a plain `python` run is world size 1 and starts no group."""
    target = parse_device(device) if device else default_device()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if target.type == "cuda":
        if world_size > 1 and target.index is not None and target.index != local_rank:
            raise QattuneError(f"device={device} under torchrun: each process trains on its own GPU, "
                               f"cuda:LOCAL_RANK (here cuda:{local_rank}); set device=cuda, and choose the GPUs "
                               "with CUDA_VISIBLE_DEVICES")
        target = torch.device("cuda", local_rank if target.index is None else target.index)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        if target.type not in ("cuda", "cpu"):
            raise QattuneError(f"multi-process training runs on cuda or cpu, not {target.type}; set device=cpu or cuda")
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def destroy_distributed() -> None:
    """Leave the process group, if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (`obj` itself in a single process). Collective: every rank calls it."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    shared = [obj]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def raise_rank0_error(error: Optional[QattuneError]) -> None:
    """Raise `error` (this rank's, or None) on every rank once rank 0's is known: a step only rank 0 takes
    (reading the checkpoint) fails with its one line everywhere, instead of the other ranks dying with a
    traceback in the next collective. Collective: every rank calls it."""
    if dist.is_initialized():
        shared = [str(error) if error is not None else None]
        dist.broadcast_object_list(shared, src=0)
        if error is None and shared[0] is not None:
            error = QattuneError(shared[0])
    if error is not None:
        raise error


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full, unsharded state dict on CPU at rank 0 ({} on other ranks); call on all ranks."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full state dict into a (possibly FSDP-sharded) model; in a process group only rank 0
    needs to hold it (the others pass {}), it is broadcast and each rank keeps its shard."""
    if not dist.is_initialized():
        model.load_state_dict(state_dict, strict=strict)
        return
    set_model_state_dict(
        model, state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    )


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with full (unsharded) tensors on CPU (all ranks call); in a single process,
    the optimizer's own state dict."""
    if not dist.is_initialized():
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `full_optimizer_state_dict`; every rank passes the full state and keeps its shard."""
    if not dist.is_initialized():
        optimizer.load_state_dict(state)
        return
    if not state.get("state"):  # a stateless optimizer (SGD without momentum): torch's loader asserts on it
        for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
