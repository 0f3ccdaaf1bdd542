"""``torch.compile`` for losses: one compiled graph per target kind, whatever the epoch.

Every registered loss traces whole (``fullgraph=True``; no host sync with ``check_inputs=False``).
Dynamo specializes on a Python float argument, so a fractional ``epoch`` that changes every step
would recompile the loss each step until the recompile limit, then silently run eagerly.
``CompiledLoss`` checks the epoch in Python and passes it to a ``DistillLoss`` as a 0-d tensor;
``warmup_factor`` then computes the warm-up in the graph.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ._base import DistillLoss, check_epoch

__all__ = ["CompiledLoss", "compile_loss"]


class CompiledLoss(nn.Module):
    """A loss and its ``torch.compile``-d forward; same calling convention, same outputs.

    ``loss_fn`` stays a submodule (``.to()``, ``state_dict`` and ``repr`` see the original); calls go
    through the compiled function, made on the first call (a copy or an unpickled loss makes its
    own). Attributes not found here are looked up on ``loss_fn``.
    """

    def __init__(self, loss_fn: Any, **compile_kwargs: Any):
        super().__init__()
        self.loss_fn = loss_fn
        self._compile_kwargs = compile_kwargs
        # only our losses take the epoch as a tensor (``warmup_factor``); a plug-in gets what it gets
        self._epoch_as_tensor = isinstance(loss_fn, DistillLoss)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def _compiled_fn(self) -> Any:
        fn = self.__dict__.get("_compiled")
        if fn is None:  # kept out of the module tree: it is not state
            inner = self.loss_fn.forward if isinstance(self.loss_fn, nn.Module) else self.loss_fn
            fn = self.__dict__["_compiled"] = torch.compile(inner, **self._compile_kwargs)
        return fn

    @property
    def name(self) -> str:
        fn = self.loss_fn
        return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__

    def __getattr__(self, item: str) -> Any:
        try:
            return super().__getattr__(item)
        except AttributeError:
            # a module loss lives in _modules, a plain callable in __dict__
            inner = self.__dict__.get("_modules", {}).get("loss_fn", self.__dict__.get("loss_fn"))
            if inner is None:
                raise
            return getattr(inner, item)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, epoch: float | None = None
    ) -> dict[str, Tensor]:
        if epoch is not None and self._epoch_as_tensor:
            epoch = torch.tensor(
                check_epoch(epoch, self.name), dtype=torch.float32, device=student_logits.device
            )
        return self._compiled_fn()(student_logits, teacher_logits, target, epoch=epoch)


def compile_loss(loss_fn: Any, **compile_kwargs: Any) -> CompiledLoss:
    """``torch.compile`` a loss (any object of the calling convention) so that the epoch does not
    recompile it; ``compile_kwargs`` go to ``torch.compile``. ``create_loss(name, compile=True)`` is
    ``compile_loss(create_loss(name))``. Needs a C++ compiler on CPU, Triton on GPU.
    """
    return CompiledLoss(loss_fn, **compile_kwargs)
