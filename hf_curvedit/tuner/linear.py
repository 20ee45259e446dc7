"""`CurvatureEditLinear`: the low-rank projection adapter of a linear layer (or GPT-2 `Conv1D`),
``y = B (Qᵀ x) + b`` in place of ``y = W x + b``."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..curvature.distributed import assign_weight, full_weight, restore_weight
from ..edit import CurvatureEdit, ModuleEditReport, q_side_of
from ..errors import InputError
from ..targets import linear_shape
from .layer import CurvatureEditLayer, single_edit_to_merge

__all__ = ["CurvatureEditLinear"]


class CurvatureEditLinear(CurvatureEditLayer):
    """Curvature edit of an `nn.Linear` or GPT-2 `Conv1D`: enabled, ``y = B (Qᵀ x) + b``; disabled, the base layer.
    Its one unit is ``""``; its stores are ``curvedit_Q``, ``curvedit_B``, ``curvedit_cutoffs``, ``curvedit_meta``
    and ``curvedit_fingerprint``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, module_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, module_name, **kwargs)
        base = self.get_base_layer()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"curvature edits support nn.Linear and transformers Conv1D, not {type(base).__name__}")
        if not base.weight.dtype.is_floating_point:
            raise TypeError(
                f"the base weight is {base.weight.dtype} (quantized?); curvature edits need a floating-point weight. "
                "Edit the unquantized model, merge, then quantize the merged checkpoint."
            )
        self.is_conv1d = isinstance(base, Conv1D)
        self.out_features, self.in_features = linear_shape(base)
        # The original weight while an edit is merged: restoring it is bit-exact in every dtype. Non-persistent:
        # it is the base weight, saved with the base model.
        self.register_buffer("curvedit_original_weight", None, persistent=False)
        self._curvedit_q_side: dict[str, str] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def candidate_units(self) -> list[str]:
        return [""]

    def base_weight(self, unit: str = "") -> torch.Tensor:
        w = self.curvedit_original_weight if self.merged else self.get_base_layer().weight
        return w.T if self.is_conv1d else w

    def _empty_tensors(self, unit: str, info: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        edit = CurvatureEdit.empty(self.out_features, self.in_features, int(info["k"]), str(info["q_side"]), dtype)
        return self._edit_tensors(unit, edit, dtype)

    def _edit_tensors(self, unit: str, edit: CurvatureEdit, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"curvedit_Q": edit.Q.to(dtype), "curvedit_B": edit.B.to(dtype), "curvedit_cutoffs": edit.cutoffs,
                "curvedit_meta": edit.meta, "curvedit_fingerprint": edit.fingerprint}

    def update_layer(self, adapter_name: str, config: Any, module_name: str) -> None:
        info = config.edited_modules.get(module_name)
        super().update_layer(adapter_name, config, module_name)
        self._curvedit_q_side[adapter_name] = str(info["q_side"])

    def set_edit(self, adapter_name: str, edit: CurvatureEdit, unit: str = "") -> None:
        if self._curvedit_q_side.get(adapter_name) != edit.q_side:
            raise InputError(f"the edit for '{self._curvedit_module_name}' does not fit the buffers of adapter "
                             f"'{adapter_name}' (Q on the {edit.q_side} side)")
        super().set_edit(adapter_name, edit, unit)

    def _after_load(self, adapter_name: str, unit: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self._curvedit_q_side[adapter_name] = q_side_of(tensors["curvedit_meta"])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._curvedit_q_side.pop(adapter_name, None)

    def reports(self, adapter_name: str, module_name: str = "") -> list[ModuleEditReport]:
        """The per-target reports of `adapter_name` on this layer (one for a linear layer)."""
        return [self.report(adapter_name, module_name)]

    def report(self, adapter_name: str, module_name: str = "") -> ModuleEditReport:
        """Per-module numbers of `adapter_name` (see [`ModuleEditReport`]), read from the stored metadata."""
        edit = self.edit(adapter_name)
        weight = self.get_base_layer().weight
        return ModuleEditReport.from_meta(
            edit.meta, module=module_name or self._curvedit_module_name, adapter=adapter_name,
            d_out=self.out_features, d_in=self.in_features,
            adapter_bytes=sum(t.numel() * t.element_size() for t in (edit.Q, edit.B)),
            weight_bytes=weight.numel() * weight.element_size(),
        )

    # ---- the edit ----------------------------------------------------------------------------------------------
    def edit(self, adapter_name: str) -> CurvatureEdit:
        """The stored edit of `adapter_name` (the buffers themselves, not copies)."""
        self._check_ready(adapter_name)
        return CurvatureEdit(Q=self.curvedit_Q[adapter_name], B=self.curvedit_B[adapter_name],
                             q_side=self._curvedit_q_side[adapter_name], cutoffs=self.curvedit_cutoffs[adapter_name],
                             meta=self.curvedit_meta[adapter_name], fingerprint=self.curvedit_fingerprint[adapter_name])

    def measured_edit(self, adapter_name: str, unit: str = "") -> CurvatureEdit:
        """The edit as exposure reads it (`hf_curvedit.exposure`): its factorization."""
        return self.edit(adapter_name)

    def edited_weight(self, adapter_name: str, unit: str = "") -> torch.Tensor:
        """``W'`` of `adapter_name` as a logical ``(d_out, d_in)`` matrix in the stored dtype."""
        return self.edit(adapter_name).dense()

    def compute_dtype(self, adapter_name: str) -> torch.dtype:
        """The dtype the unmerged forward of `adapter_name` multiplies in (see `CurvatureEditConfig.compute_dtype`)."""
        dtype = self._curvedit_compute_dtype.get(adapter_name)
        return dtype if dtype is not None else self.get_base_layer().weight.dtype

    def runs_dense(self, adapter_name: str) -> bool:
        """Whether the unmerged forward multiplies by the dense ``W'``: the factorization is not smaller than it."""
        rank = int(self.curvedit_Q[adapter_name].shape[1])
        return rank * (self.in_features + self.out_features) >= self.in_features * self.out_features

    def _compute_matrices(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        # (W',) for the dense path; (first, second) with y = (x @ firstᵀ) @ secondᵀ for the factorized one.
        Q, B = self.curvedit_Q[adapter_name], self.curvedit_B[adapter_name]
        cached = self._curvedit_compute_cache.get((adapter_name, dtype))
        if (cached is not None and cached[0]() is Q and cached[2]() is B
                and (cached[1], cached[3]) == (Q._version, B._version)):
            return cached[4]
        with torch.no_grad():
            if self.runs_dense(adapter_name):
                mats: tuple[torch.Tensor, ...] = (self.edit(adapter_name).dense().to(dtype).contiguous(),)
            elif self._curvedit_q_side[adapter_name] == "input":  # W' = B Qᵀ: y = (x Q) Bᵀ
                mats = (Q.T.to(dtype).contiguous(), B.to(dtype).contiguous())
            else:  # W' = Q Bᵀ: y = (x B) Qᵀ
                mats = (B.T.to(dtype).contiguous(), Q.to(dtype).contiguous())
        # weak references: a device move or a reload must not keep the replaced factors alive through the cache
        self._curvedit_compute_cache[(adapter_name, dtype)] = (weakref.ref(Q), Q._version, weakref.ref(B), B._version,
                                                               mats)
        return mats

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._edit_to_run()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        Q, B = self.curvedit_Q[name], self.curvedit_B[name]
        dtype = self.compute_dtype(name)
        bias = self.get_base_layer().bias
        h = x.to(dtype)
        if dtype == Q.dtype and not self.runs_dense(name):
            # the stored factors themselves, in their own precision
            y = (h @ Q) @ B.T if self._curvedit_q_side[name] == "input" else (h @ B) @ Q.T
            if bias is not None:
                y = y + bias.to(y.dtype)
            return y.to(x.dtype)
        mats = self._compute_matrices(name, dtype)
        b = bias.to(dtype) if bias is not None else None
        y = F.linear(h, mats[0], b) if len(mats) == 1 else F.linear(F.linear(h, mats[0]), mats[1], b)
        return y.to(x.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Replace the base weight by ``W'`` of the (single) active edit; the original is kept for `unmerge`.

        With ``safe_merge`` the edited weight is checked for NaN/inf before it replaces anything.
        """
        name = single_edit_to_merge(self, adapter_names, self.has_edit)
        if name is None:
            return
        base = self.get_base_layer()
        new = self.edited_weight(name)
        new = (new.T if self.is_conv1d else new).to(base.weight.dtype).contiguous()
        if safe_merge and not torch.isfinite(new).all():
            raise InputError(f"the edited weight of adapter '{name}' contains NaN or inf; not merging it")
        self.curvedit_original_weight = assign_weight(base.weight, new)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the original weight back (bit-exact: it is the very tensor that was replaced)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        restore_weight(self.get_base_layer().weight, self.curvedit_original_weight)
        self.curvedit_original_weight = None
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W' - W`` in the base layer's storage layout (full rank: the edit is a replacement, not a low-rank
        delta)."""
        base = self.get_base_layer()
        delta = self.edited_weight(adapter_name).to(torch.float32) - full_weight(self.base_weight()).to(torch.float32)
        return (delta.T if self.is_conv1d else delta).to(base.weight.dtype)
