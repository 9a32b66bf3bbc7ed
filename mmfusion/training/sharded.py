"""Sharded data parallel (`train.strategy=fsdp`): torch's FSDP2 (`fully_shard`) through Lightning's
`ModelParallelStrategy`, on GPUs (NCCL) and on CPUs (gloo) alike.

Lightning's own `FSDPStrategy` wraps torch's first FSDP, which refuses CPUs ("FSDP needs a non-CPU
accelerator device"), as Lightning does before it ("requires a GPU accelerator"). FSDP2 runs on CPUs,
so the path the GPUs take is the one the CPU test suite runs (tests/training/test_fsdp.py): every
transformer block is a shard unit, the rest of the model (embeddings, heads) one more; each process holds
1/N of every weight, gradient and AdamW moment, and of the EMA. Checkpoints are sharded folders written
with torch.distributed.checkpoint (one file per process), the exported model folder a gathered copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from mmfusion.model.transformer import Block


class ShardedDataParallel(ModelParallelStrategy):
    """`ModelParallelStrategy` as pure sharded data parallel: one data-parallel group of all processes
    (no tensor parallelism; Lightning's `auto` would make one node a tensor-parallel group), sharded
    checkpoints. The process group is gloo on CPUs, NCCL on GPUs."""

    strategy_name = "fsdp"

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=True)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """The sharded folder (one file per process, meta.pt) is written beside its place and renamed into
        it once every process is done: a run killed while writing leaves the last checkpoint whole (DCP on
        its own overwrites the folder file by file)."""
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `mesh`: each transformer block a unit (gathered for its own forward
    and backward only), then the model itself with the parameters left (embeddings, heads), which stay
    gathered from its forward to the end of the backward: the objective calls the heads after the
    forward (`text_logits`, `image_output`), and the root's gradients are reduced once the backward ends.
    A model sharded already is left as it is."""
    if isinstance(model, FSDPModule):
        return model
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    # zero gradients for the weights a process left out of its graph (a batch without captions, the text
    # head), so that every process reduces the same list; `UsedWeights` tells them apart again
    model.set_reduce_scatter_unused_params(True)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state of a (sharded) model on the CPU of rank 0; other processes get an empty dict.
    A collective: every process calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class UsedWeights:
    """Which weights outside the blocks took part in a step's backward on any process. The reduce-scatter
    gives every weight a gradient (zero where a process left it out of its graph), so that the processes
    reduce the same list; the weights no process used then lose theirs again (`drop_unused_grads`), and
    AdamW skips them as it does in one process or under DDP (stepped with zeros, their moments would decay
    and the weight decay apply). The blocks are used by every token."""

    def __init__(self) -> None:
        self.names: list[str] = []  # the watched weights, in the model's order
        self.used: set[str] = set()
        self.hooked: set[int] = set()

    def watch(self, model: nn.Module) -> None:
        """After the forward: the root's weights are gathered then, plain tensors that autograd fills."""
        for name, p in model.named_parameters():
            if isinstance(p, DTensor) or not p.requires_grad or id(p) in self.hooked:
                continue
            p.register_post_accumulate_grad_hook(lambda _, name=name: self.used.add(name))
            self.hooked.add(id(p))
            if name not in self.names:
                self.names.append(name)

    def drop_unused_grads(self, model: nn.Module) -> None:
        """Before the optimizer step (a collective): take away the gradients of the weights no process used."""
        if not self.names:
            return
        used = torch.tensor([float(n in self.used) for n in self.names])
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
        unused = {n for n, u in zip(self.names, used.tolist(), strict=True) if not u}
        for name, p in model.named_parameters():
            if name in unused:
                p.grad = None
        self.used.clear()


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trained weight its optimizer state from the start, as its first step would make it
    (AdamW: zero moments, step 0): one step with zero gradients at learning rate 0 for the weights that
    have none, then their step counts back to 0. A weight no step has used yet (the text head of a run
    that has seen no caption) would otherwise be missing from a sharded checkpoint, and
    torch.distributed.checkpoint cannot load such a checkpoint into the optimizer ("Missing key")."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    fresh = [p for p in params if not optimizer.state.get(p)]
    if not fresh:
        return
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    for p in fresh:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    for p in fresh:
        step = optimizer.state[p].get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()


def load_sharded_checkpoint(module: nn.Module, folder: Path) -> None:
    """A sharded checkpoint folder's weights into an unsharded module, in one process (no process group)."""
    state = {"state_dict": module.state_dict()}
    dcp_load(state, checkpoint_id=folder, no_dist=not torch.distributed.is_initialized())
    module.load_state_dict(state["state_dict"])


def is_sharded(strategy: Any) -> bool:
    return isinstance(strategy, ShardedDataParallel)
