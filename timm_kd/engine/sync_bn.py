"""``--sync-bn``: BatchNorm statistics over the whole global batch, as timm's ``train.py`` does.

Without it, each of P processes normalizes with the mean and variance of its own batch (1/P of
the global batch), so P processes train a BatchNorm model differently from one process with the
same global batch (a LayerNorm model is unaffected). With it, every BatchNorm layer of the student
uses the statistics of the global batch: P processes then follow one process with the global batch
within float rounding (running statistics included).

The conversion is timm's ``convert_sync_batchnorm`` (its ``BatchNormAct2d`` keeps its activation).
On devices with torch's SyncBatchNorm kernels (CUDA, XPU, HPU) those layers run as they are. On
the CPU (gloo) torch's layer and DDP refuse them, so there each converted layer becomes a
``PlainSyncBatchNorm`` (same parameters and buffers) that computes the same statistics in plain
PyTorch: the per-channel sums and element counts are summed over the processes, then the
centred squares (two passes: no ``E[x^2] - E[x]^2`` cancellation). Departure from torch's kernel:
statistics in float32 whatever the input dtype, and an empty per-process batch is not supported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["convert_sync_batchnorm", "PlainSyncBatchNorm"]

#: device types that torch's SyncBatchNorm kernels run on
KERNEL_DEVICES = ("cuda", "xpu", "hpu")


class _SumOverRanks(torch.autograd.Function):
    """``x`` summed over the processes of ``group``, differentiable.

    A custom Function because autograd cannot see through ``dist.all_reduce`` (an in-place
    collective). Each process' input reaches every process' output, so the gradient of an input
    is the sum over the processes of the gradients of the output: the backward is the same sum.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class PlainSyncBatchNorm(_BatchNorm):
    """A converted SyncBatchNorm layer (timm's ``SyncBatchNormAct`` included: its ``drop`` and
    ``act`` are applied after) for devices without torch's kernels: in training with several
    processes it normalizes with the global statistics computed in plain PyTorch (see the module
    docstring); otherwise it is a plain BatchNorm. Not an ``nn.SyncBatchNorm``, which DDP refuses
    on the CPU."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        group = getattr(self, "process_group", None) or dist.group.WORLD
        if self.training and dist.is_initialized() and dist.get_world_size(group) > 1:
            y = self._global_batch_norm(x, momentum, group)
        else:
            track = not self.training or self.track_running_stats
            y = F.batch_norm(
                x,
                self.running_mean if track else None,
                self.running_var if track else None,
                self.weight,
                self.bias,
                self.training or self.running_mean is None,
                momentum,
                self.eps,
            )
        if hasattr(self, "drop"):  # timm's SyncBatchNormAct
            y = self.drop(y)
        if hasattr(self, "act"):
            y = self.act(y)
        return y

    def _global_batch_norm(self, x: torch.Tensor, momentum: float, group) -> torch.Tensor:
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.new_full((1,), x.numel() // c)
        total = _SumOverRanks.apply(torch.cat([xf.sum(dims), count]), group)
        n = total[c]
        mean = total[:c] / n
        centred = xf - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims), group) / n  # biased, to normalize
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():  # running variance unbiased, as torch's BatchNorm
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """Every BatchNorm layer of ``model`` synchronized over the default process group; returns the
    model (the same object unless it is itself a BatchNorm layer) and the number of layers."""
    model = timm_convert_sync_batchnorm(model)
    n = 0
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):  # timm's SyncBatchNormAct too
            n += 1
            if device.type not in KERNEL_DEVICES:
                # same state, another forward: the layer's parameters and buffers are untouched
                m.__class__ = PlainSyncBatchNorm
    return model, n
