"""Which processes share one training batch.

A data-parallel engine splits each batch over a group of processes. A loss that compares the samples
of a batch with each other (SupCon) must still see all of them, or N processes would compute another
loss than one process with the same batch; the engine names the group here and the loss gathers over
it (the same idea as SyncBatchNorm's process group, for a loss). Outside a data-parallel engine the
batch is the process's own and nothing is sent.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

_group: dist.ProcessGroup | None = None
_sent_bytes = 0  # what whole_batch sent since the engine last asked (take_sent_bytes)


@contextmanager
def spread_over(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Within this block each process holds an equal slice of every training batch, over `group`."""
    global _group
    previous, _group = _group, group
    try:
        yield
    finally:
        _group = previous


def whole_batch(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every process's slice of each tensor, concatenated in rank order, and where this process's
    slice starts. Gradients flow back to the process each slice came from."""
    if _group is None or dist.get_world_size(_group) == 1:  # a one-process group holds the whole batch
        return list(tensors), 0
    global _sent_bytes
    rank = dist.get_rank(_group)
    _sent_bytes += sum(t.numel() * t.element_size() for t in tensors)
    gathered = [_AllGather.apply(tensor.contiguous(), _group) for tensor in tensors]
    return gathered, rank * len(tensors[0])


class _AllGather(torch.autograd.Function):
    """Concatenated slices of every process; the backward sums each slice's gradient over the processes
    and hands each its own. Written here because torch.distributed.nn's all_gather sends its backward
    through an all-to-all that gloo runs as scatters addressed by group rank, which fails on a subgroup
    (a node's group: "Global rank 0 is not part of group", torch 2.14). An all-reduce of the whole
    gradient works on every backend and group, at the cost of sending all of it (activations of one
    batch, small beside the gradients DDP sends)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), len(tensor)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def spread() -> int:
    """How many processes share the batch (1 outside a data-parallel engine)."""
    return 1 if _group is None else dist.get_world_size(_group)


def take_sent_bytes() -> int:
    """Bytes of this process's slices sent to the others by `whole_batch` since the last call."""
    global _sent_bytes
    sent, _sent_bytes = _sent_bytes, 0
    return sent


class WholeBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the whole batch when processes hold slices of it, on any device.

    PyTorch's SyncBatchNorm runs on GPUs only, so on the CPU (gloo) `sync_batchnorm` uses this: it
    gathers the slices, normalises the whole batch exactly as one process would (running statistics
    too) and keeps its own slice. It sends whole activations rather than two statistics per channel,
    which is fine for the CPU runs it exists for. `_check_input_dim` accepts 2-D to 5-D input, so one
    class stands for BatchNorm1d/2d/3d."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or _group is None:
            return super().forward(input)
        (whole,), offset = whole_batch(input)
        return super().forward(whole)[offset: offset + len(input)]


def with_whole_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm layer replaced by a WholeBatchNorm holding the same parameter and
    buffer objects (so an optimizer built before still updates them)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            whole = WholeBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            whole.weight, whole.bias = child.weight, child.bias
            whole.running_mean, whole.running_var, whole.num_batches_tracked = child.running_mean, child.running_var, child.num_batches_tracked
            whole.train(child.training)
            setattr(module, name, whole)
        else:
            with_whole_batchnorm(child)
    return module
