"""Where the backward pass of a factor pass starts and stops: frozen weights, and the inputs of the first target
modules as its leaves.

A factor pass needs ``g = ∂loss/∂y`` at every target module's output and no weight gradient. During the pass every
parameter is frozen, and a forward pre-hook on each target module turns an input that does not depend on an earlier
target (it does not require grad) into a fresh leaf that does: a *root*. Every target's output then descends from a
root, and ``torch.autograd.grad(loss, roots)`` reaches every one of them while computing nothing below the first
target and no weight gradient. Asking for the roots' gradients, not the targets' outputs', also keeps autograd from
holding every output's gradient until the pass ends (one activation-sized buffer per target).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

__all__ = ["GradientRoots", "frozen_parameters"]


class GradientRoots:
    """Forward pre-hooks that make target modules' gradient-free inputs the leaves of the backward pass.

    Modules that read the very same input tensor (gate and up projections) get the very same leaf, so they still
    share it (and one A factor). `reset` between batches."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self._made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The forward pre-hook (``register_forward_pre_hook(..., with_kwargs=True)``)."""
        if args:
            x, put = args[0], lambda leaf: ((leaf, *args[1:]), kwargs)
        else:
            key = next((k for k in ("hidden_states", "input", "x") if k in kwargs), None)
            if key is None:
                return None
            x, put = kwargs[key], lambda leaf: (args, {**kwargs, key: leaf})
        if not (torch.is_tensor(x) and x.is_floating_point()) or x.requires_grad or not torch.is_grad_enabled():
            return None
        seen = self._made.get(id(x))
        if seen is None or seen[0] is not x:
            seen = self._made[id(x)] = (x, x.detach().requires_grad_())
            self.tensors.append(seen[1])
        return put(seen[1])

    def register(self, module: nn.Module) -> Any:
        return module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def reset(self) -> None:
        self.tensors.clear()
        self._made.clear()


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block no parameter of ``model`` requires grad; each gets its own setting back afterwards."""
    thawed = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in thawed:
            p.requires_grad_(False)
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)
