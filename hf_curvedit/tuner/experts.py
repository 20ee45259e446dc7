"""The curvature edit of a fused experts module: each targeted 3D projection is replaced, expert by expert.

transformers 5 keeps a mixture-of-experts layer's projections as 3D parameters of one experts module (see
`hf_curvedit.targets.is_experts_module`). Like PEFT's ``ParamWrapper`` (LoRA's ``target_parameters``), this layer wraps
that module. Unmerged, it runs the module's own forward with each edited expert applied in factored form
(`experts_forward.py`, following the experts implementation transformers picked: eager, grouped or batched matmul),
so no dense copy of the experts is held except for experts whose factorization is not smaller than their matrix;
merging writes ``W'`` into the parameter. Per adapter and targeted parameter it stores the stacked, zero-padded
factors ``W'_e = out_e in_eᵀ`` of `hf_curvedit.edit.ExpertsEdit`, each expert's statistics and fingerprint, and the
tokens each expert's factors saw. An unedited (under-sampled) expert keeps its base matrix bit for bit.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..curvature.distributed import assign_weight, full_weight, restore_weight
from ..curvature.experts import replaced_forwards
from ..edit import (
    FINGERPRINT_SIZE,
    META_FIELDS,
    META_INDEX,
    ExpertsEdit,
    ExpertsFactors,
    ModuleEditReport,
    expert_is_edited,
)
from ..errors import InputError
from ..targets import expert_parameter_names, experts_target, is_experts_module
from ..utils import execution_device
from .experts_forward import BASE, DENSE, FACTORED, ExpertsProjection
from .layer import CurvatureEditLayer, single_edit_to_merge
from .layout_forwards import edited_forwards
from .stores import PinnedDtypeBufferDict, store_name

__all__ = ["CurvatureEditExperts"]


class CurvatureEditExperts(CurvatureEditLayer):
    """Curvature edits of the expert projections (``gate_up_proj``/``up_proj``, ``down_proj``) of an experts module.
    Each projection is a unit (`hf_curvedit.tuner.stores`) with the stores ``curvedit_{out,in,meta,fingerprint,
    cutoffs,tokens}_<parameter>``.

    Enabled, the forward runs the wrapped module's experts computation with each edited projection applied expert by
    expert (`hf_curvedit.tuner.experts_forward`): an unedited expert by its base matrix, an edited one by its factors
    ``(x in_e) out_eᵀ``, or by a dense ``W'_e`` only where the factorization is not smaller than the matrix. No dense
    copy of an edited stack is kept. Disabled, the wrapped module runs untouched.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, module_name: str, **kwargs: Any) -> None:
        if not is_experts_module(base_layer):
            raise TypeError(f"{type(base_layer).__name__} is not a fused experts module")
        super().__init__(base_layer, module_name, **kwargs)
        # the original parameters while an edit is merged (bit-exact unmerge); not saved: they are the base weights
        self.curvedit_original = PinnedDtypeBufferDict({}, persistent=False)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def candidate_units(self) -> list[str]:
        return expert_parameter_names(self.base_layer)

    def base_weight(self, unit: str = "") -> torch.Tensor:
        """The unedited ``(experts, d_out, d_in)`` weight of parameter `unit` (logical layout), also while merged."""
        w = self.curvedit_original[unit] if unit in self.curvedit_original else self._parameter(unit)
        return experts_target(self.base_layer, unit).to_logical(w)

    def _empty_tensors(self, unit: str, info: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        num, d_out, d_in = self.base_weight(unit).shape
        k = int(info["k"])
        empty = {"out": torch.zeros(num, d_out, k, dtype=dtype), "in": torch.zeros(num, d_in, k, dtype=dtype),
                 "meta": torch.zeros(num, len(META_FIELDS), dtype=torch.float64),
                 "fingerprint": torch.zeros(num, FINGERPRINT_SIZE, dtype=torch.float64),
                 "cutoffs": torch.zeros(num, d_out, dtype=torch.int64), "tokens": torch.zeros(num, dtype=torch.int64)}
        return {store_name(kind, unit): t for kind, t in empty.items()}

    def _edit_tensors(self, unit: str, edit: ExpertsEdit, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out, inp, cutoffs = edit.stacked(dtype)
        values = {"out": out, "in": inp, "meta": edit.meta, "fingerprint": edit.fingerprint, "cutoffs": cutoffs,
                  "tokens": edit.num_tokens}
        return {store_name(kind, unit): t for kind, t in values.items()}

    def reports(self, adapter_name: str, module_name: str = "") -> list[ModuleEditReport]:
        """One report per edited parameter (see `ModuleEditReport.from_expert_meta`)."""
        self._check_ready(adapter_name)
        name = module_name or self._curvedit_module_name
        out = []
        for p in self.units_of(adapter_name):
            weight = self._parameter(p)
            _, d_out, d_in = self.base_weight(p).shape
            factors = (self._store_of("out", p)[adapter_name], self._store_of("in", p)[adapter_name])
            out.append(ModuleEditReport.from_expert_meta(
                self._store_of("meta", p)[adapter_name], self._store_of("tokens", p)[adapter_name],
                module=f"{name}.{p}", adapter=adapter_name, d_out=d_out, d_in=d_in,
                adapter_bytes=sum(t.numel() * t.element_size() for t in factors),
                weight_bytes=weight.numel() * weight.element_size()))
        return out

    def _parameter(self, unit: str) -> torch.Tensor:
        # the stored parameter of a projection, wherever the experts class keeps it (`expert_layouts`)
        return experts_target(self.base_layer, unit).parameter()

    def _store_of(self, kind: str, param: str) -> PinnedDtypeBufferDict:
        return getattr(self, store_name(kind, param))

    # ---- the edited weights --------------------------------------------------------------------------------------
    def edited_weight(self, adapter_name: str, unit: str = "") -> torch.Tensor:
        """``W'`` of parameter `unit` as a logical ``(experts, d_out, d_in)`` stack in the stored dtype; unedited
        experts are their base matrices."""
        self._check_ready(adapter_name)
        out, inp = self._store_of("out", unit)[adapter_name], self._store_of("in", unit)[adapter_name]
        edited = expert_is_edited(self._store_of("meta", unit)[adapter_name]).to(out.device)
        dense = torch.bmm(out, inp.mT)
        base = full_weight(self.base_weight(unit)).to(dense.dtype)
        return torch.where(edited[:, None, None], dense, base)

    def measured_edit(self, adapter_name: str, unit: str = "") -> ExpertsFactors:
        """The edit of parameter `unit` as exposure reads it (`hf_curvedit.exposure.ExpertsFactors`): the stacked
        per-expert factors and which experts are edited."""
        self._check_ready(adapter_name)
        edited = expert_is_edited(self._store_of("meta", unit)[adapter_name])
        return ExpertsFactors(self._store_of("out", unit)[adapter_name], self._store_of("in", unit)[adapter_name],
                              edited)

    def runs_dense(self, adapter_name: str, unit: str = "") -> torch.Tensor:
        """bool ``(experts,)``: the experts the unmerged forward of `adapter_name` multiplies by a dense ``W'_e``, the
        edited ones whose factorization is not smaller than their matrix (``k·(d_in + d_out) ≥ d_in·d_out``, with the
        rank ``k`` rounded up to the kernels' alignment, `_aligned_rank`)."""
        meta = self._store_of("meta", unit)[adapter_name]
        _, d_out, d_in = self.base_weight(unit).shape
        rank = _aligned_rank(meta[:, META_INDEX["rank"]], self.compute_dtype(adapter_name, unit))
        return expert_is_edited(meta) & (rank * (d_in + d_out) >= d_in * d_out)

    def compute_dtype(self, adapter_name: str, unit: str = "") -> torch.dtype:
        """The dtype the unmerged forward of `adapter_name` multiplies the edited experts in (see
        `CurvatureEditConfig.compute_dtype`)."""
        dtype = self._curvedit_compute_dtype.get(adapter_name)
        return dtype if dtype is not None else self._parameter(unit).dtype

    def _projection(self, adapter_name: str, param: str, device: torch.device) -> ExpertsProjection:
        # what the unmerged forward multiplies by, made once per (adapter, parameter, device) from the stores and
        # cached with (weak references to) them: a reload or a device move makes it stale
        stores = [self._store_of(k, param)[adapter_name] for k in ("out", "in", "meta")]
        dtype = self.compute_dtype(adapter_name, param)
        key = (adapter_name, param, device, dtype)
        cached = self._curvedit_compute_cache.get(key)
        if cached is not None and all(r() is t and v == t._version for (r, v), t in zip(cached[0], stores)):
            return cached[1]
        out, inp, meta = stores
        with torch.no_grad():
            edited = expert_is_edited(meta).cpu()
            dense = self.runs_dense(adapter_name, param).cpu()
            factored = edited & ~dense
            kind = torch.full(edited.shape, BASE, dtype=torch.int64)
            kind[factored], kind[dense] = FACTORED, DENSE
            slot = torch.zeros(edited.shape, dtype=torch.int64)
            projection = ExpertsProjection(kind.to(device), tuple(sorted(set(kind.tolist()))), slot)
            if bool(factored.any()):
                slot[factored] = torch.arange(int(factored.sum()))
                # the rank the factored experts need (a dense expert may have padded the stores further); the zero
                # columns added for alignment change nothing
                k = int(_aligned_rank(meta[:, META_INDEX["rank"]].cpu()[factored], dtype).max())
                rows = None if bool(factored.all()) else factored.nonzero().squeeze(1).to(out.device)
                projection.first = _factor_stack(inp, rows, k, device, dtype)
                projection.second = _factor_stack(out, rows, k, device, dtype).mT
            if bool(dense.any()):
                slot[dense] = torch.arange(int(dense.sum()))
                rows = dense.nonzero().squeeze(1).to(out.device)
                projection.dense = torch.bmm(inp[rows], out[rows].mT).to(device, dtype)  # W'_eᵀ of those experts
            projection.slot = slot.to(device)
        self._curvedit_compute_cache[key] = ([(weakref.ref(t), t._version) for t in stores], projection)
        return projection

    def _edited_parameter(self, adapter_name: str, param: str) -> torch.Tensor:
        # W' in the parameter's storage layout and dtype (what a merge writes)
        with torch.no_grad():
            w = self.edited_weight(adapter_name, param)
            return experts_target(self.base_layer, param).to_storage(w.to(self._parameter(param).dtype))

    # ---- forward, merge ------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._edit_to_run()
        if name is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        device = execution_device(self.base_layer, self._parameter(self.units_of(name)[0]))
        projections = {p: self._projection(name, p, device) for p in self.units_of(name)}
        # the module's own call, its hooks (accelerate's included) and experts implementation, with this forward
        with replaced_forwards(edited_forwards(self.base_layer, projections)):
            return self.base_layer(hidden_states, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Replace each edited parameter by ``W'`` of the (single) active edit; the originals are kept for `unmerge`."""
        name = single_edit_to_merge(self, adapter_names, self.has_edit)
        if name is None:
            return
        new = {p: self._edited_parameter(name, p) for p in self.units_of(name)}
        if safe_merge and not all(torch.isfinite(w).all() for w in new.values()):
            raise InputError(f"the edited weights of adapter '{name}' contain NaN or inf; not merging them")
        for p, w in new.items():
            self.curvedit_original[p] = assign_weight(self._parameter(p), w)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the original parameters back (bit-exact: they are the very tensors that were replaced)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        for p in list(self.curvedit_original.keys()):
            restore_weight(self._parameter(p), self.curvedit_original[p])
            del self.curvedit_original[p]
        self.merged_adapters.clear()



def _aligned_rank(rank: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # grouped matmul kernels want 16-byte strides, so a factor stack's rank is rounded up to a multiple of
    # 16 bytes' worth of elements
    align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return torch.ceil(rank / align) * align


def _factor_stack(t: torch.Tensor, rows: torch.Tensor | None, k: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    # the factored experts' rows (None: all) of a zero-padded factor stack, k columns (zero-padded further where it
    # has fewer); the stored stack itself, not a copy, where it already is that
    t = t if rows is None else t[rows]
    t = t[:, :, :k] if t.shape[-1] >= k else F.pad(t, (0, k - t.shape[-1]))
    t = t.to(device, dtype)
    return t if t.is_contiguous() else t.contiguous()
