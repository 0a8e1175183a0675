"""Data-parallel training over ``torch.distributed`` ranks: one model, the global batch's losses.

A detector's ``fit`` trains distributed when a default process group is initialised (by
``torchrun ... -m pyanomaly fit``, :func:`init_from_env`, or the user's own
``torch.distributed.init_process_group``) and the call is not inside :func:`local_fits`:

- ``batch_size`` stays the *global* batch; each global batch is split into equal consecutive
  slices, rank r taking slice r (the ragged last batch is dropped: every rank steps together).
- The model is wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA), which averages
  the gradients. The contrastive losses gather what they contrast against from every rank with
  :func:`gather_rows`, a gradient-preserving all-gather (its backward sums each slice's gradient
  over the ranks, SimCLR's practice), and BatchNorm uses the global batch's statistics
  (:class:`GlobalBatchNorm2d`). Each rank's loss is the global batch's loss over its own
  queries / anchors, so the summed gradient is the global batch's: a seeded fit on N ranks takes
  the same steps as on one process with the same global batch (tests/test_distributed.py).
- Random draws do not depend on the rank: CPC-AD's crops and flips come from per-image
  generators, AnoMem's augmentations and both methods' negatives are drawn for the whole global
  batch on every rank (same seed), each rank using its slice.
- Only rank 0 writes files (checkpoints, saved models, run folders).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "GlobalBatchNorm2d", "all_reduce_sum", "broadcast_object", "gather_rows", "init_from_env", "is_main", "local_fits",
    "mean_over_ranks", "merge_dicts", "rank_device", "shutdown", "use_global_batchnorm", "use_plain_batchnorm", "world",
]

_local_depth = 0
_owned_group = False  # whether init_from_env created the default group (shutdown destroys it)


def _group_size() -> int:
    """Ranks in the default process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world() -> tuple[int, int]:
    """(rank, world size) of the training in progress: (0, 1) unless a process group with more than
    one rank is initialised and we are not inside :func:`local_fits`."""
    if _local_depth or _group_size() == 1:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Whether this process writes a fit's files: rank 0, any rank inside :func:`local_fits` (the fit
    is its own), or a process that is not distributed at all."""
    return _local_depth > 0 or _group_size() == 1 or dist.get_rank() == 0


@contextlib.contextmanager
def local_fits():
    """Fits inside run on this rank alone (independent fits spread over the ranks, e.g. protocols)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def init_from_env(device: str | torch.device = "auto") -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1):
    NCCL when training on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Returns whether
    training is distributed; does nothing when a group exists or ``WORLD_SIZE`` is 1 or unset."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    global _owned_group
    cuda = torch.cuda.is_available() and str(device) != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    _owned_group = True
    return True


def shutdown() -> None:
    """Destroy the process group :func:`init_from_env` created (nothing otherwise)."""
    global _owned_group
    if _owned_group and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group = False


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (``value`` itself when not distributed)."""
    if _group_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_dicts(part: dict) -> dict:
    """The union of every rank's ``part`` (disjoint keys), on every rank; ``part`` when not distributed."""
    if _group_size() == 1:
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for piece in parts for key, value in piece.items()}


def rank_device(device: torch.device) -> torch.device:
    """``device`` for this rank: CUDA ranks each train on ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and world()[1] > 1 and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


def mean_over_ranks(value):
    """The mean over the ranks of a Python number, or of each number of a dict of them (one
    all-reduce either way; for logs and histories); ``value`` itself on one rank."""
    if world()[1] == 1:
        return value
    keys = list(value) if isinstance(value, dict) else None
    total = torch.tensor([float(value[k]) for k in keys] if keys is not None else [float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    means = (total / world()[1]).tolist()
    return dict(zip(keys, means)) if keys is not None else means[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, differentiable (the gradient is summed over ranks too)."""
    if world()[1] == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, counts):
        rank, size = world()
        longest = max(counts)
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous())
        ctx.counts, ctx.rank = counts, rank
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        counts, rank = ctx.counts, ctx.rank
        pieces = list(grad.split(counts))
        longest = max(counts)
        stacked = grad.new_zeros((len(counts), longest) + tuple(grad.shape[1:]))
        for i, piece in enumerate(pieces):
            stacked[i, : piece.shape[0]] = piece
        dist.all_reduce(stacked)  # every rank's loss used every slice: sum their gradients
        return stacked[rank, : counts[rank]].clone(), None


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's ``tensor`` (M_r, ...) along dim 0 in rank order, differentiably.

    Returns (the (sum M_r, ...) tensor, where this rank's rows start). Ranks may hold different
    row counts. The backward gives each rank the sum over ranks of the gradient of its rows."""
    rank, size = world()
    if size == 1:
        return tensor, 0
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    return _GatherRows.apply(tensor, counts), sum(counts[:rank])


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks (two
    differentiable all-reduces: the mean, then the centred second moment), on CPU (gloo) and CUDA
    alike; plain BatchNorm2d when not distributed or in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        dims = (0, 2, 3)
        count = all_reduce_sum(x.new_tensor(float(x.numel() // x.shape[1])))
        mean = all_reduce_sum(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        var = all_reduce_sum((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def use_global_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm2d of ``module`` into a :class:`GlobalBatchNorm2d` in place (the same
    parameters and buffers: a no-op until training is distributed). Returns ``module``."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = GlobalBatchNorm2d
    return module


def use_plain_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`use_global_batchnorm` (in place). Returns ``module``."""
    for child in module.modules():
        if type(child) is GlobalBatchNorm2d:
            child.__class__ = nn.BatchNorm2d
    return module
