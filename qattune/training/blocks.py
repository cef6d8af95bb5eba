"""Per-block model transforms: activation checkpointing, torch.compile, FSDP2 sharding.

All work on any model whose transformer blocks sit in an `nn.ModuleList` (by default `model.layers`)
and leave parameter names unchanged, so checkpoints load the same with or without them.
Apply in this order: activation checkpointing, compile, then sharding.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qattune.errors import QattuneError


def transformer_blocks(model: nn.Module, layers_attr: str = "layers") -> nn.ModuleList:
    """The model's list of blocks, or a clear error naming the attribute."""
    blocks = getattr(model, layers_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise QattuneError(
            f"model {type(model).__name__} has no nn.ModuleList '{layers_attr}' of transformer blocks; "
            "per-block activation checkpointing, compile and FSDP need one"
        )
    return blocks


def _checkpointed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, layers_attr: str = "layers") -> nn.Module:
    """Recompute each block's activations in backward instead of storing them (RNG state preserved,
    so dropout masks are the same in the recompute)."""
    for block in transformer_blocks(model, layers_attr):
        block.forward = _checkpointed(block.forward)
    return model


FAKE_QUANT_COMPILE_BROKEN_TORCH = ("2.11", "2.12")
"""[first, last) torch versions whose compiled fake-quantized blocks train wrong. On torch 2.11 every
parameter inside a compiled fake-quantized block got a zero gradient, on CPU and CUDA alike (the gradient
reached the input through the residual stream only): torch.compile routes an autograd.Function's
gradient to the wrong output (pytorch/pytorch#180642, a 2.11 regression; its fix was put forward for
2.12, which was not tried here). torch 2.13 trains them like eager (tests/quant/test_fake_quant_recompute.py)."""


def compiles_fake_quant_wrong() -> bool:
    """Whether this torch is one of `FAKE_QUANT_COMPILE_BROKEN_TORCH`."""
    first, last = FAKE_QUANT_COMPILE_BROKEN_TORCH
    return first <= torch.__version__ < last


def compile_blocks(model: nn.Module, layers_attr: str = "layers", **compile_kwargs) -> nn.Module:
    """`torch.compile` each block in place (one graph reused by every block of the same shape). Blocks
    with fake quantization on a torch in `FAKE_QUANT_COMPILE_BROKEN_TORCH` raise a clear error instead."""
    if compiles_fake_quant_wrong() and any(
            hasattr(module, "fake_quant_enabled") for module in transformer_blocks(model, layers_attr).modules()):
        raise QattuneError(
            f"compile: true with fake quantization is not supported on torch {torch.__version__}: its compiled "
            "blocks train with zero gradients (pytorch/pytorch#180642). Set compile: false, or use torch 2.13 "
            "(tested) or one older than 2.11")
    for block in transformer_blocks(model, layers_attr):
        block.compile(**compile_kwargs)
    return model


def modules_of_another_dtype(model: nn.Module) -> list[nn.Module]:
    """Modules whose own trainable parameters have another dtype than most of the model's. FSDP2 needs
    one dtype per group, so each gets a group of its own (and keeps its dtype: no cast)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.requires_grad:
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    if len(counts) < 2:
        return []
    main = max(counts, key=counts.__getitem__)
    return [module for module in model.modules()
            if any(p.requires_grad and p.dtype != main for p in module.parameters(recurse=False))]


def shard_model(
    model: nn.Module,
    layers_attr: str = "layers",
    reshard_after_forward: bool = True,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: Optional[torch.dtype] = None,
    device_type: Optional[str] = None,
) -> nn.Module:
    """FSDP2: `fully_shard` every block, then the root, over all ranks of the default process group
    (gloo on CPU works the same as NCCL on CUDA). Gradients are averaged over ranks. `device_type`
    (default: the parameters' device) names the device the shards compute on, for a model on meta."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise QattuneError("shard_model needs a process group; start the run with torchrun (qattune run --nproc_per_node N)")
    device_type = device_type or next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for module in modules_of_another_dtype(model):  # e.g. fp32 learned scales in a bf16 model
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    blocks = transformer_blocks(model, layers_attr)
    for index, block in enumerate(blocks):
        # the last block's backward starts right after its forward: keep it gathered
        keep_gathered = index == len(blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward and not keep_gathered, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model


def shard_model_from_rank0(model: nn.Module, device: torch.device, **shard_kwargs) -> nn.Module:
    """FSDP2-shard a model whose weights only rank 0 holds (on CPU; the other ranks built it on the meta
    device), without ever holding the whole model on a device.

    Rank 0 keeps its state dict on CPU and every rank turns its model into empty structure; each rank
    shards that structure and allocates only its own shards on `device`; then rank 0 broadcasts one tensor
    at a time and every rank keeps its shard. Training starts exactly as if each rank had loaded the
    whole model (the values are rank 0's, bit for bit).
    """
    import torch.distributed as dist

    from .distributed import load_full_state_dict

    full = model.state_dict() if dist.get_rank() == 0 else {}
    model.to("meta")  # the CPU tensors live on in `full` (rank 0) until they are broadcast
    shard_model(model, device_type=torch.device(device).type, **shard_kwargs)
    model.to_empty(device=device)
    load_full_state_dict(model, full)
    return model
