"""``torch.compile`` for losses: one compiled graph per target kind, whatever the epoch.

Every registered loss traces whole (``fullgraph=True``): no host syncs, no nested autograd, no
data-dependent Python branches. What ``compile_loss`` adds to a plain ``torch.compile(loss_fn)`` is
the epoch: Dynamo specializes on a Python float argument, so a fractional ``epoch`` that changes
every step would recompile the loss each step until the recompile limit, after which it silently runs
eagerly. ``CompiledLoss`` checks the epoch in Python and passes it to a ``DistillLoss`` as a 0-d
tensor on the logits' device; ``warmup_factor`` then computes the warm-up in the graph.

Each device type compiles on its first call (``CompiledLoss.compile_kwargs_for``): on CPU a loss may
add Inductor options of its own (a ``cpu_compile_options`` dict, e.g. DTKD's realization threshold),
measured there and left out elsewhere.

What it buys (``python benchmarks/losses.py --compile``, docs/losses.md#speed): the fused
Functions' passes over ``[B, C]`` become per-row loops that keep each row in cache, so the extra
cost of a multi-temperature loss over cross-entropy shrinks. The first call compiles (seconds, cached
on disk by Inductor); a second batch shape compiles once more, with a dynamic batch size.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ._base import DistillLoss, check_epoch

__all__ = ["CompiledLoss", "compile_loss"]


class CompiledLoss(nn.Module):
    """A loss and its ``torch.compile``-d forward; same calling convention, same outputs.

    ``loss_fn`` stays a submodule (``.to()``, ``state_dict`` and ``repr`` see the original); calls go
    through the compiled function. Attributes not found here are looked up on ``loss_fn``.
    """

    def __init__(self, loss_fn: Any, **compile_kwargs: Any):
        super().__init__()
        self.loss_fn = loss_fn
        # compiled on first use per device type (see compile_kwargs_for); kept out of the module
        # tree (they are not state)
        self.__dict__["_compiled"] = {}
        self.__dict__["_compile_kwargs"] = compile_kwargs
        # only our losses take the epoch as a tensor (``warmup_factor``); a plug-in gets what it gets
        self._epoch_as_tensor = isinstance(loss_fn, DistillLoss)

    def compile_kwargs_for(self, device_type: str) -> dict[str, Any]:
        """The ``torch.compile`` keyword arguments for logits on ``device_type``: the caller's, plus on
        CPU the loss's ``cpu_compile_options`` (Inductor options measured to help it there) when the
        caller chose neither a ``mode`` nor another backend, and only the options this torch has."""
        kwargs = dict(self._compile_kwargs)
        extra = getattr(self.loss_fn, "cpu_compile_options", None) if device_type == "cpu" else None
        if extra and "mode" not in kwargs and kwargs.get("backend", "inductor") == "inductor":
            import torch._inductor.config as inductor_config

            known = {k: v for k, v in extra.items() if hasattr(inductor_config, k)}
            if known:
                kwargs["options"] = {**known, **kwargs.get("options", {})}
        return kwargs

    def _compiled_for(self, device_type: str) -> Any:
        fn = self._compiled.get(device_type)
        if fn is None:
            inner = self.loss_fn.forward if isinstance(self.loss_fn, nn.Module) else self.loss_fn
            fn = self._compiled[device_type] = torch.compile(inner, **self.compile_kwargs_for(device_type))
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
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        *,
        epoch: float | None = None,
    ) -> dict[str, torch.Tensor]:
        if epoch is not None and self._epoch_as_tensor:
            epoch = torch.tensor(
                check_epoch(epoch, self.name), dtype=torch.float32, device=student_logits.device
            )
        compiled = self._compiled_for(student_logits.device.type)
        return compiled(student_logits, teacher_logits, target, epoch=epoch)


def compile_loss(loss_fn: Any, **compile_kwargs: Any) -> CompiledLoss:
    """``torch.compile`` a loss (any object of the calling convention) so that the epoch does not
    recompile it. ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``fullgraph``, ``backend``...).

    ``create_loss(name, compile=True)`` is the same as ``compile_loss(create_loss(name))``; the engine's
    ``--compile-loss`` uses it. Needs what ``torch.compile`` needs: a C++ compiler on CPU, Triton on GPU.
    """
    return CompiledLoss(loss_fn, **compile_kwargs)
