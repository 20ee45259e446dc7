"""Hooks that accumulate the raw K-FAC sums ``Σ a aᵀ`` and ``Σ g gᵀ`` of linear layers over forward/backward passes.

For a linear layer y = W a (+ b) the Fisher block of W is approximated as G ⊗ A. A forward hook on each target layer
adds the selected rows of its input ``a`` to A's sum and registers a tensor hook on its output ``y``, which adds the
selected rows of ``g = ∂loss/∂y`` to G's sum during the backward pass. Which rows are samples is the task's call
(`tasks.py`); the loss is summed over samples, so each g is a per-sample gradient. The sums are divided by the sample
count by `fit_factors`, not here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..targets import TargetWeight, weight_targets
from ..utils import execution_device, heap_trim_helps, release_free_memory
from .config import FactorConfig, accumulator_dtype
from .experts import ExpertRecorder, recording_experts
from .partitions import split_expert_slice
from .roots import GradientRoots, frozen_parameters
from .sums import InputSharing, accumulate_upper, mirror_upper
from .tasks import FactorTask, SamplePositions, task_for

__all__ = ["FactorCollector", "InputSharing", "accumulator_dtype", "collect_factor_sums"]

class HookedCollector:
    """What the factor pass and the EK-FAC pass share: as a context manager, each linear target gets a gradient root
    and a forward hook (``_make_hook(name)``), and each experts module a gradient root and a recording forward
    (``_make_expert_recorder(params)``); leaving it removes them all. Subclasses set ``model``, ``modules``,
    ``_experts``, ``_roots``, ``_handles`` and ``_stack``."""

    model: nn.Module
    modules: dict[str, nn.Module]
    _experts: dict[nn.Module, Any]
    _roots: GradientRoots
    _handles: list[Any]
    _stack: contextlib.ExitStack

    def __enter__(self):  # noqa: ANN204 - the subclass itself
        for n, m in self.modules.items():
            self._handles.append(self._roots.register(m))
            self._handles.append(m.register_forward_hook(self._make_hook(n)))
        self._handles += [self._roots.register(m) for m in self._experts]
        self._stack.enter_context(recording_experts({m: self._make_expert_recorder(params)
                                                     for m, params in self._experts.items()}, self.model))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.close()


class FactorCollector(HookedCollector):
    """Forward and gradient hooks that accumulate upper-triangle covariance sums of inputs and output-gradients.

    Use as a context manager (the hooks live inside it); call `begin_batch` with the batch's sample positions before
    its forward pass and `end_batch` after its backward pass. Modules fed the very same input tensor (gate and up
    projections) share one A sum; ``a_alias`` maps such a module to the one that owns it.

    An expert projection (a 3D parameter of a fused experts module, see `hf_curvedit.targets.TargetWeight`) gets one
    A and one G per expert, stacked as ``(experts, d, d)``, and one sample count per expert (a list): its module runs
    `hf_curvedit.curvature.experts.recording_forward` inside the context, which shows each expert only its own tokens.
    """

    def __init__(self, model: nn.Module, names: list[str], dtype: torch.dtype):
        targets = weight_targets(model)
        missing = [n for n in names if split_expert_slice(n)[0] not in targets]
        if missing:
            raise InputError(f"{missing[:3]} are neither linear layers nor expert projections of this model")
        self.model = model
        self.names = names
        self.targets: dict[str, TargetWeight] = {n: targets[split_expert_slice(n)[0]] for n in names}
        self.modules = {n: t.module for n, t in self.targets.items() if not t.is_experts}
        # experts module -> parameter -> (name, first expert, end): the slice of experts this collector accumulates
        self._experts: dict[nn.Module, dict[str, tuple[str, int, int]]] = {}
        for n, t in self.targets.items():
            if t.is_experts:
                _, e0, e1 = split_expert_slice(n)
                self._experts.setdefault(t.module, {})[t.param_name] = (n, e0 or 0, t.num_experts if e1 is None
                                                                        else e1)
        self.dtype = dtype
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.count: dict[str, int | list[int]] = {}
        for n, t in self.targets.items():
            if t.is_experts:
                _, e0, e1 = self._experts[t.module][t.param_name]
                self.count[n] = [0] * (e1 - e0)
            else:
                self.count[n] = 0
        self._sharing = InputSharing()
        self._alias_known = False
        self._muted = False
        # per factor ("<name>.A" / "<name>.G"), whether every sample that reached it was finite, as a tensor on its
        # device (no host sync per batch): a non-finite factor then says where it came from
        self._finite: dict[str, torch.Tensor] = {}
        self._positions: SamplePositions | None = None
        self._idx: torch.Tensor | None = None
        self._valid_rows: torch.Tensor | None = None
        self._roots = GradientRoots()
        self._handles: list[Any] = []
        self._stack = contextlib.ExitStack()

    @property
    def a_alias(self) -> dict[str, str]:
        """Module → the module whose A it shares (found in the first batch)."""
        return self._sharing.alias

    # ---- the engine's protocol (`hf_curvedit.curvature.passes`) -----------------------------------------------
    def sums(self) -> dict[str, torch.Tensor]:
        """The running sums by name (``<entry>.A``, ``<entry>.G``), to checkpoint and reduce."""
        return {**{f"{n}.A": t for n, t in self.A.items()}, **{f"{n}.G": t for n, t in self.G.items()}}

    def state(self) -> dict[str, Any]:
        """The counts, shared inputs and which factors saw non-finite samples (JSON)."""
        return {"count": dict(self.count), "a_alias": dict(self.a_alias),
                "nonfinite": sorted(k for k, ok in self._finite.items() if not bool(ok))}

    def load(self, sums: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from a checkpoint's sums and state."""
        for key, t in sums.items():
            name, kind = key.rsplit(".", 1)
            (self.A if kind == "A" else self.G)[name] = t
        self.count = dict(state["count"])
        self._sharing.alias = dict(state["a_alias"])
        self._alias_known = True
        self._finite = {k: torch.tensor(False) for k in state.get("nonfinite", [])}

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """The state of one partition collected by several processes: counts added, shared inputs and non-finite
        factors of any of them."""
        count: dict[str, Any] = {}
        for st in states:
            for n, c in st["count"].items():
                mine = count.get(n)
                count[n] = c if mine is None else ([a + b for a, b in zip(mine, c)] if isinstance(c, list)
                                                   else mine + c)
        alias = {k: v for st in states for k, v in st["a_alias"].items()}
        return {"count": count, "a_alias": alias, "nonfinite": sorted({k for st in states for k in st["nonfinite"]})}

    def _note_finite(self, key: str, x: torch.Tensor) -> None:
        ok = torch.isfinite(x).all()
        seen = self._finite.get(key)
        self._finite[key] = ok if seen is None else (seen.to(ok.device) & ok)


    def begin_batch(self, positions: SamplePositions, muted: bool = False) -> None:
        """Start a batch whose samples are ``positions``: a (B, T) bool mask, ``"cls"`` or ``"all"``. A ``muted``
        batch runs (its backward reaches the same modules) but adds nothing."""
        self._muted = muted
        if torch.is_tensor(positions):
            self._valid_rows = positions.reshape(-1)
            self._idx = self._valid_rows.nonzero().squeeze(1)
        elif positions not in ("cls", "all"):
            raise InputError(f"sample positions must be a (batch, tokens) mask, 'cls' or 'all'; got {positions!r}")
        self._positions = positions
        self._sharing.reset()
        self._roots.reset()

    @property
    def roots(self) -> list[torch.Tensor]:
        """This batch's leaves of the backward pass (see `hf_curvedit.curvature.roots`)."""
        return self._roots.tensors

    def _select(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if self._positions == "cls":
            if t.dim() not in (2, 3):
                raise InputError(f"token_positions='cls' needs (batch, tokens, features) activations, but {name} sees "
                                 f"shape {tuple(t.shape)}; use token_positions='all'.")
            x = t[:, 0, :] if t.dim() == 3 else t  # (batch, features): one row per image already (e.g. the head)
        elif self._positions == "all":
            x = t.reshape(-1, t.shape[-1])
        else:
            assert self._idx is not None
            flat = t.reshape(-1, t.shape[-1])
            idx = self._idx if self._idx.device == flat.device else self._idx.to(flat.device)
            x = flat.index_select(0, idx)
        return _as_float(x)

    def _num_rows(self, t: torch.Tensor) -> int:
        if self._positions == "cls":
            return int(t.shape[0])
        if self._positions == "all":
            return t.numel() // t.shape[-1]
        assert self._idx is not None
        return int(self._idx.numel())

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._positions is None or self._muted or not torch.is_grad_enabled():
                # a pass the model itself runs without gradients (HRM's recurrent steps) is no K-FAC sample
                return
            x = inputs[0]
            if not self._alias_known:
                self._sharing.observe(name, x)
            if name not in self.a_alias:
                a = self._select(x.detach(), name)
                self._note_finite(f"{name}.A", a)
                acc = self.A.get(name)
                if acc is None:
                    acc = self.A[name] = torch.zeros(a.shape[1], a.shape[1], dtype=self.dtype, device=a.device)
                accumulate_upper(acc, a)
            _require_grad(output, name)
            self.count[name] += self._num_rows(x)
            output.register_hook(self._make_grad_hook(name))

        return hook

    def _make_grad_hook(self, name: str) -> Callable:
        def grad_hook(grad: torch.Tensor) -> None:
            g = self._select(grad, name)
            self._note_finite(f"{name}.G", g)
            acc = self.G.get(name)
            if acc is None:
                acc = self.G[name] = torch.zeros(g.shape[1], g.shape[1], dtype=self.dtype, device=g.device)
            accumulate_upper(acc, g)

        return grad_hook

    def _make_expert_recorder(self, params: dict[str, tuple[str, int, int]]) -> ExpertRecorder:
        def record(param: str, expert: int, tokens: torch.Tensor, num_rows: int, a: torch.Tensor,
                   y: torch.Tensor) -> None:
            if param not in params or self._positions is None or self._muted:
                return
            name, first, end = params[param]
            if not first <= expert < end or not torch.is_grad_enabled():
                return
            expert -= first
            rows = self._expert_rows(name, tokens, num_rows)
            target = self.targets[name]
            if name not in self.A:
                self.A[name] = torch.zeros(end - first, target.d_in, target.d_in, dtype=self.dtype, device=a.device)
                self.G[name] = torch.zeros(end - first, target.d_out, target.d_out, dtype=self.dtype, device=a.device)
            x = _as_float(a.detach() if rows is None else a.detach()[rows])
            if x.shape[0] == 0:
                return
            self._note_finite(f"{name}.A", x)
            accumulate_upper(self.A[name][expert], x)
            self.count[name][expert] += int(x.shape[0])
            _require_grad(y, name)
            acc_g = self.G[name][expert]

            def grad_hook(grad: torch.Tensor) -> None:
                g = _as_float(grad if rows is None else grad[rows])
                self._note_finite(f"{name}.G", g)
                accumulate_upper(acc_g, g)

            y.register_hook(grad_hook)

        return record

    def _expert_rows(self, name: str, tokens: torch.Tensor, num_rows: int) -> torch.Tensor | None:
        """Which of an expert's routed tokens are samples (``None``: all of them)."""
        if self._positions == "all":
            return None
        if self._positions == "cls":
            raise InputError(f"token_positions='cls' cannot pick the class token out of the routed tokens of {name}; "
                             "use token_positions='all' for a mixture-of-experts model.")
        assert self._valid_rows is not None
        if num_rows != self._valid_rows.numel():
            raise RuntimeError(f"the experts of {name} see {num_rows} token rows, but the batch has "
                               f"{self._valid_rows.numel()} positions: the model does not route one row per position")
        valid = self._valid_rows if self._valid_rows.device == tokens.device else self._valid_rows.to(tokens.device)
        return valid[tokens].nonzero().squeeze(1)

    def end_batch(self) -> None:
        self._alias_known = self._alias_known or not self._muted
        self._positions = None
        self._idx = None
        self._valid_rows = None
        self._roots.reset()
        self._sharing.reset()

    def finalized_sums(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full symmetric sums (lower blocks mirrored from the upper ones, in place: the running sums stay valid)."""
        A = {n: mirror_upper(t) for n, t in self.A.items()}
        G = {n: mirror_upper(t) for n, t in self.G.items()}
        return A, G


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _require_grad(output: torch.Tensor, name: str) -> None:
    if not output.requires_grad:
        raise RuntimeError(
            f"the output of {name} does not depend on its input through autograd (it was computed under "
            "torch.no_grad or detached inside the module), so its output gradient cannot be collected"
        )


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (of its first parameter otherwise)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return execution_device(emb, emb.weight)
    return next(model.parameters()).device


def _samples_in(positions: SamplePositions, batch: dict[str, torch.Tensor]) -> int:
    # for the progress bar: valid positions of a mask, else one per example
    if torch.is_tensor(positions):
        return int(positions.sum())
    return int(next(iter(batch.values())).shape[0])


def collect_factor_sums(
    model: nn.Module,
    batches: Iterable[tuple[int, dict[str, torch.Tensor]]],
    module_names: list[str],
    config: FactorConfig,
    *,
    task: FactorTask | None = None,
    collector: FactorCollector | None = None,
    on_batch_end: Callable[[int, FactorCollector], None] | None = None,
    progress: tqdm | None = None,
) -> FactorCollector:
    """Run forward/backward over ``batches`` and accumulate raw (un-normalized) factor sums.

    The lower-level engine behind :func:`fit_factors`; ``batches`` yields ``(global_index, batch)`` with the tensors
    the task reads (``input_ids``/``attention_mask`` for a language model; ``pixel_values`` and, for empirical labels,
    ``labels`` for an image classifier). ``task`` defaults to :func:`default_task`. No weight gradient is computed or
    stored.
    """
    task = task_for(model, task)
    task.validate(model, config)
    col = collector or FactorCollector(model, module_names, accumulator_dtype(config))
    device = input_device(model)
    trim_heap = heap_trim_helps(device)
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model), col:
            for b, batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                positions = task.sample_positions(batch, config)
                col.begin_batch(positions, muted=b < 0)  # b < 0: a step taken only to keep processes in step
                with torch.enable_grad():
                    loss = task.compute_loss(model, batch, config, b)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss ({loss.item()}) at batch {b}; check the model's "
                                                 "dtype and inputs")
                    # Down to the roots only (roots.py): the tensor hooks see every g, and autograd computes no
                    # weight gradient and nothing below the first target.
                    if col.roots:
                        torch.autograd.grad(loss, col.roots, allow_unused=True)
                col.end_batch()
                if trim_heap:
                    release_free_memory()
                if b < 0:
                    continue
                if progress is not None:
                    progress.update(_samples_in(positions, batch))
                if on_batch_end is not None:
                    on_batch_end(b, col)
    finally:
        model.train(was_training)
    return col
