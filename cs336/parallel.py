"""Training past one device: FSDP2 sharding, activation checkpointing and the global reductions.

``shard_model`` (``--train.parallel=fsdp``) applies one ``fully_shard`` per ``TransformerBlock``, then
the root, on a 1-D ``DeviceMesh`` of the ranks (torchtitan's ``parallelize`` order; an explicit CPU mesh
with gloo); ``local`` gives the dim-0 shard the project's kernels step in place, ``full_grad(p)`` the
all-gathered gradient for Muon. Deviation from torchtitan, whose ``MixedPrecisionPolicy`` casts every
parameter and the block inputs: under bf16 only the blocks' matmul weights are gathered in bf16 (norm
weights, embedding and LM head are fp32 groups, inputs not cast), so FSDP computes what
``torch.autocast`` computes in one process; gradients reduce-scatter in fp32. ``micro_batch`` keeps
gradients unsharded and parameters gathered until the last micro-batch. Activation checkpointing
(``full``: every block; ``selective``: even-indexed blocks) uses non-reentrant ``torch.utils.checkpoint``;
``_recomputed`` restores the kernel backend. State-dict names do not change. User-facing behaviour:
README, "More than one device".
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from cs336 import ops
from cs336.config import ACTIVATION_CHECKPOINTING, PARALLEL, ConfigError  # noqa: F401

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

    from cs336.config import ModelConfig

try:  # torch >= 2.5 (2.11 on the GPU machine, 2.13 here)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment, misc]  # isinstance(t, ()) is False


def is_sharded(t: torch.Tensor | None) -> bool:
    return isinstance(t, DTensor) if DTensor else False  # type: ignore[truthy-function]  # () without DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return cast("DTensor", t).to_local() if is_sharded(t) else t


def full_grad(p: torch.Tensor) -> torch.Tensor | None:
    """The whole gradient of ``p`` (all-gathered from every rank's shard under FSDP)."""
    g = p.grad
    return cast("DTensor", g).full_tensor() if is_sharded(g) else g


def checkpointed_blocks(num_layers: int, mode: str) -> list[int]:
    """Indices of the blocks recomputed in backward under ``mode``."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(num_layers))
    if mode == "selective":
        return list(range(0, num_layers, 2))
    raise ConfigError(f"train.activation_checkpointing={mode!r}; valid choices: "
                      f"{', '.join(ACTIVATION_CHECKPOINTING)}")


def _recomputed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        backend = ops.get_backend()  # the recompute runs in backward, outside the model's use_backend

        def again(*a, **k):
            with ops.use_backend(backend):
                return forward(*a, **k)
        return checkpoint(again, *args, use_reentrant=False, **kwargs)
    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> list[int]:
    """Make the blocks ``checkpointed_blocks`` names recompute their forward in backward (the
    module tree and state dict are unchanged); returns their indices."""
    layers = cast("nn.ModuleList", model.layers)
    chosen = checkpointed_blocks(len(layers), mode)
    for i in chosen:
        block = layers[i]
        block.forward = _recomputed(block.forward)
    return chosen


def check_fsdp_launch(world_size: int) -> None:
    """fsdp needs torchrun with two or more ranks; one process has nothing to shard across."""
    if world_size < 2:
        raise ConfigError("--train.parallel=fsdp needs two or more ranks (launch with torchrun "
                          "--nproc_per_node=N, N >= 2); on one device drop --train.parallel "
                          "(the same training, unsharded)")


def shard_model(model: nn.Module, device: torch.device, autocast: str) -> nn.Module:
    """``fully_shard`` every block, then the root, on a mesh of all ranks (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = None
    if autocast == "bf16":
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    for block in cast("nn.ModuleList", model.layers):
        norms = (cast(nn.Module, block.ln1), cast(nn.Module, block.ln2)) if bf16 else ()
        for norm in norms:  # fp32 units of their own under bf16
            if any(True for _ in norm.parameters()):
                fully_shard(norm, mesh=mesh)
        fully_shard(block, mesh=mesh, **cast("dict[str, Any]", {"mp_policy": bf16} if bf16 else {}))
    fully_shard(model, mesh=mesh)
    for name in ("loss", "hidden_states"):  # entry points other than forward gather the root too
        register_fsdp_forward_method(model, name)
    return model


def micro_batch(model: nn.Module, last: bool):
    """Context for one micro-batch's forward and backward under FSDP: all but the last keep the
    gradients unreduced and the parameters gathered (no reshard, no reduce-scatter)."""
    fsdp = cast("FSDPModule", model)  # shard_model made it one
    fsdp.set_requires_gradient_sync(last)
    fsdp.set_reshard_after_backward(last)
    return contextlib.nullcontext()


@torch.no_grad()
def clip_global(params, max_l2_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """``cs336.nn_utils.clip_gradients`` over sharded gradients: the squares of every rank's shards
    are summed across ranks, so the norm (returned, before clipping) is the global one."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total += g.float().pow(2).sum()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    norm = total.sqrt()
    scale = torch.clamp(max_l2_norm / (norm + eps), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm


def max_across_ranks(peaks: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (NaN-preserving: NaN is mapped to inf first)."""
    peaks = torch.nan_to_num(peaks.clone(), nan=float("inf"))
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return peaks


def full_model_copy(model: nn.Module, is_main: bool) -> nn.Module | None:
    """A plain (unsharded, CPU-gathered) copy of a sharded model on rank 0, None elsewhere. Every
    rank must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from cs336.model import TransformerLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    copy = TransformerLM.from_config(cast("ModelConfig", model.config))
    copy.load_state_dict(state)
    return copy.eval()
