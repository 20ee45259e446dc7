"""`LambdaCollector`: the hooks of the EK-FAC pass, which accumulate ``Σ_samples (U_Gᵀ D U_A)²`` for each module, and
for each expert of an expert projection.

For each sample (a sequence, or an image) a layer's weight gradient ``D = Σ_t g_t a_tᵀ`` over its sample positions is
rotated into the eigenbasis, ``U_Gᵀ D U_A = (G_rot)ᵀ A_rot`` with ``A_rot = a U_A`` and ``G_rot = g U_G`` (the tokens
are rotated first: cheaper than rotating ``D`` while a sample has fewer positions than the layer has features), and
its square is added to ``Λ``'s sum. No weight gradient is formed by autograd; the hooks see each layer's input and
output gradient, as the factor pass does.

An expert sees only the tokens routed to it: its ``D_e`` of a sample sums over that sample's tokens routed to ``e``
(a sample none reached adds nothing), with the input and the output gradient the factor pass records (so the routing
weight reaches ``Λ_e`` as it reaches ``G_e``: through the gradient of the projection's output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError
from ..targets import weight_targets
from .collector import HookedCollector, _require_grad
from .eigen import ModuleEigen
from .experts import ExpertRecorder
from .partitions import split_expert_slice
from .roots import GradientRoots
from .tasks import SamplePositions

__all__ = ["LambdaCollector"]

# One chunk of per-sample rotated gradients holds at most this many entries (bounds the pass's extra memory).
_CHUNK_ENTRIES = 1 << 24


def _in_sequences(rows: torch.Tensor, where: torch.Tensor, num_rows: int, samples: int) -> torch.Tensor:
    """Rows of some token positions placed at those positions of (samples, positions, features) zeros."""
    out = torch.zeros(num_rows, rows.shape[-1], dtype=rows.dtype, device=rows.device)
    out[where] = rows
    return out.view(samples, -1, rows.shape[-1])


class LambdaCollector(HookedCollector):
    """Forward and gradient hooks that accumulate ``Σ_samples (U_Gᵀ D U_A)²`` for each entry (a linear layer, an
    expert projection, or a slice of its experts ``"...experts.gate_up_proj[0:4]"``).

    The same protocol as `FactorCollector` (a context manager; `begin_batch` before a batch's forward pass,
    `end_batch` after its backward pass), so `collect_factor_sums` drives it. ``bases(entry)`` gives an entry's
    eigenbasis (stacked for experts: only its slice's experts).
    """

    def __init__(self, model: nn.Module, entries: list[str], bases: Callable[[str], ModuleEigen],
                 dtype: torch.dtype, devices: Mapping[str, torch.device]):
        targets = weight_targets(model)
        self.model, self.dtype = model, dtype
        self.modules: dict[str, nn.Module] = {}
        self._experts: dict[nn.Module, dict[str, tuple[str, int]]] = {}  # module -> param -> (entry, first)
        converted: list[tuple[torch.Tensor, torch.Tensor]] = []

        def conv(t: torch.Tensor, device: torch.device) -> torch.Tensor:
            # gate and up share one U_A (the same tensor, or equal ones read from a cache): converted once
            for src, dst in converted[-4:]:
                if src is t or (src.shape == t.shape and dst.device == device and torch.equal(src, t)):
                    return dst
            converted.append((t, t.to(device, dtype)))
            return converted[-1][1]

        self.U_A: dict[str, torch.Tensor] = {}
        self.U_G: dict[str, torch.Tensor] = {}
        for entry in entries:
            name, first, _ = split_expert_slice(entry)
            t = targets[name]
            e = bases(entry)
            self.U_A[entry], self.U_G[entry] = conv(e.eigvecs_A, devices[entry]), conv(e.eigvecs_G, devices[entry])
            if t.is_experts:
                self._experts.setdefault(t.module, {})[t.param_name] = (entry, first or 0)
            else:
                self.modules[entry] = t.module
        self._sums: dict[str, torch.Tensor] = {}
        self._shapes = {entry: (targets[split_expert_slice(entry)[0]].d_out,
                                targets[split_expert_slice(entry)[0]].d_in) for entry in entries}
        self.num_samples = 0
        self._muted = False
        self._roots = GradientRoots()
        self._positions: SamplePositions | None = None
        self._batch_rows = 0
        self._rotated: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._stack = contextlib.ExitStack()

    # ---- the engine's protocol (`hf_curvedit.curvature.passes`) -----------------------------------------------
    def sums(self) -> dict[str, torch.Tensor]:
        """The running sums by name (``<entry>.lambda``), to checkpoint and reduce."""
        return {f"{n}.lambda": t for n, t in self._sums.items()}

    def state(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples}

    def load(self, sums: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from a checkpoint's sums and state."""
        self._sums = {k.removesuffix(".lambda"): t for k, t in sums.items()}
        self.num_samples = int(state["num_samples"])

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        return {"num_samples": sum(int(s["num_samples"]) for s in states)}

    def begin_batch(self, positions: SamplePositions, muted: bool = False) -> None:
        """Start a batch whose sample positions are ``positions``: a (B, T) bool mask, ``"cls"`` or ``"all"``. A
        ``muted`` batch runs (its backward reaches the same modules) but adds nothing."""
        if not torch.is_tensor(positions) and positions not in ("cls", "all"):
            raise InputError(f"sample positions must be a (batch, tokens) mask, 'cls' or 'all'; got {positions!r}")
        if self._experts and not torch.is_tensor(positions):
            raise InputError("the EK-FAC pass of expert projections needs the positions of each sequence (a causal "
                             f"language model's mask), not token_positions={positions!r}")
        self._muted = muted
        self._positions = positions
        self._rotated.clear()
        self._roots.reset()

    @property
    def roots(self) -> list[torch.Tensor]:
        """This batch's leaves of the backward pass (see `hf_curvedit.curvature.roots`)."""
        return self._roots.tensors

    def _per_sample(self, t: torch.Tensor, masked: bool) -> torch.Tensor:
        """``t`` as (samples, positions, features); with ``masked``, positions that are no samples are zeroed (one
        side of each product is enough)."""
        if t.dim() == 2:  # (batch, features): one position per sample already (e.g. a classifier's head)
            return t[:, None, :]
        t = t.reshape(t.shape[0], -1, t.shape[-1])
        if self._positions == "cls":
            return t[:, :1, :]
        if masked and torch.is_tensor(self._positions):
            mask = self._positions.to(t.device).reshape(t.shape[0], -1)
            return t * mask[..., None].to(t.dtype)
        return t

    def _accumulate(self, entry: str, acc_index: int | None, g_rot: torch.Tensor, a_rot: torch.Tensor) -> None:
        """Add ``Σ_samples ((G_rot)ᵀ A_rot)²`` of (samples, positions, features) tensors to ``entry``'s sum (of its
        expert ``acc_index`` for an expert projection)."""
        d_out, d_in = self._shapes[entry]
        acc = self._sums.get(entry)
        if acc is None:
            stack = () if acc_index is None else (self.U_A[entry].shape[0],)
            acc = self._sums[entry] = torch.zeros(*stack, d_out, d_in, dtype=self.dtype, device=g_rot.device)
        elif acc.device != g_rot.device:  # resumed from a checkpoint, read to the CPU
            acc = self._sums[entry] = acc.to(g_rot.device)
        into = acc if acc_index is None else acc[acc_index]
        step = max(1, _CHUNK_ENTRIES // (d_out * d_in))
        for s in range(0, g_rot.shape[0], step):
            # (samples, d_out, d_in): each sample's weight gradient in the eigenbasis
            rotated = torch.bmm(g_rot[s:s + step].mT, a_rot[s:s + step])
            into += rotated.square_().sum(0)

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._positions is None or self._muted or not torch.is_grad_enabled():
                return
            x = inputs[0]
            U_A = self.U_A[name]
            key = (id(x), id(U_A))
            if key not in self._rotated:  # modules that read the same input with the same basis rotate it once
                a = self._per_sample(x.detach(), masked=True)
                self._rotated[key] = (x, a.to(self.dtype) @ U_A)
            a_rot = self._rotated[key][1]
            self._batch_rows = a_rot.shape[0]
            _require_grad(output, name)

            def grad_hook(grad: torch.Tensor) -> None:
                g_rot = self._per_sample(grad, masked=False).to(self.dtype) @ self.U_G[name]
                self._accumulate(name, None, g_rot, a_rot)

            output.register_hook(grad_hook)

        return hook

    def _make_expert_recorder(self, params: dict[str, tuple[str, int]]) -> ExpertRecorder:
        def record(param: str, expert: int, tokens: torch.Tensor, num_rows: int, a: torch.Tensor,
                   y: torch.Tensor) -> None:
            if param not in params or self._positions is None or self._muted or not torch.is_grad_enabled():
                return
            entry, first = params[param]
            local = expert - first
            if not 0 <= local < self.U_A[entry].shape[0]:
                return
            mask = self._positions.reshape(-1).to(tokens.device)  # type: ignore[union-attr]
            if num_rows != mask.numel():
                raise RuntimeError(f"the experts of {entry} see {num_rows} token rows, but the batch has "
                                   f"{mask.numel()} positions: the model does not route one row per position")
            keep = mask[tokens]
            if not bool(keep.any()):
                return
            rows, where = keep.nonzero().squeeze(1), tokens[keep]
            samples = self._positions.shape[0]  # type: ignore[union-attr]
            # the routed tokens, rotated, back in their sequences (zero elsewhere): each sample's D_e sums over its
            # own tokens
            a_rot = _in_sequences(a.detach()[rows].to(self.dtype) @ self.U_A[entry][local], where, num_rows, samples)
            _require_grad(y, entry)

            def grad_hook(grad: torch.Tensor) -> None:
                g_rot = _in_sequences(grad[rows].to(self.dtype) @ self.U_G[entry][local], where, num_rows, samples)
                self._accumulate(entry, local, g_rot, a_rot)

            y.register_hook(grad_hook)

        return record

    def end_batch(self) -> None:
        if self._muted:
            pass
        elif torch.is_tensor(self._positions):
            self.num_samples += int(self._positions.reshape(self._positions.shape[0], -1).any(1).sum())
        elif self._positions is not None:
            self.num_samples += self._batch_rows
        self._positions = None
        self._batch_rows = 0
        self._rotated.clear()
        self._roots.reset()
