"""The low-rank projection adapter layer: ``y = B (Qᵀ x) + b`` replaces ``y = W x + b``.

A layer stores, per adapter, the factorization of an edit computed by `hf_curvedit.edit.compute_edit` (see
docs/method.md), and applies, merges or disables it. It knows nothing about factors, ρ or target patterns: the model
(`build.py`) computes edits and hands them over, or loading fills the buffers. Its stores and errors are in
`stores.py`.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..edit import CurvatureEdit, ModuleEditReport, fingerprint_mismatch, q_side_of, weight_fingerprint
from ..targets import linear_shape
from ..utils import parse_dtype
from .stores import (
    ContentDigest,
    DamagedAdapterError,
    FingerprintStore,
    PinnedDtypeBufferDict,
    WrongBaseModelError,
    wrong_base_message,
)

# the errors stay importable from here, where they were before the stores had their own module
__all__ = ["CurvatureEditLayer", "CurvatureEditLinear", "DamagedAdapterError", "WrongBaseModelError"]



def single_edit_to_merge(layer: BaseTunerLayer, adapter_names: list[str] | None, has_edit: Any) -> str | None:
    """The one edit of ``layer`` to merge (None if there is none): curvature edits replace the weight, so merging
    two, or one on top of another, has no meaning."""
    names = [a for a in check_adapters_to_merge(layer, adapter_names) if has_edit(a)]
    if not names:
        return None
    if len(names) > 1 or layer.merged:
        raise ValueError(
            f"curvature edits replace the weight, so only one can be merged at a time (asked for {names}, "
            f"already merged {layer.merged_adapters}); unmerge first"
        )
    return names[0]

class CurvatureEditLayer(ContentDigest, BaseTunerLayer):
    """Adapter state of one linear layer: per adapter, the factorization of ``W'`` and its metadata, as buffers.

    Everything is a persistent buffer (never a parameter: the edit is fixed) kept in float32 (float64 when the base
    is float64), whatever dtype the base model is cast to. It is also the base class of every curvature-edit tuner
    layer (PEFT's ``tuner_layer_cls``): `hf_curvedit.tuner.experts.CurvatureEditExperts` keeps its own stores and
    overrides the linear specifics, and the tuner talks to both through `has_edit`, `set_edit`, `reports` and
    `check_base`.
    """

    # No trainable adapter weights: PEFT toggles requires_grad on `adapter_layer_names`, which must not touch buffers.
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("curvedit_Q", "curvedit_B", "curvedit_cutoffs", "curvedit_meta",
                                           "curvedit_fingerprint")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.curvedit_Q = PinnedDtypeBufferDict({}, persistent=True)
        self.curvedit_B = PinnedDtypeBufferDict({}, persistent=True)
        self.curvedit_cutoffs = PinnedDtypeBufferDict({}, persistent=True)
        self.curvedit_meta = PinnedDtypeBufferDict({}, persistent=True)
        self.curvedit_fingerprint = FingerprintStore({}, persistent=True)
        # a weak reference: a strong one would be registered as a child module (a cycle in the module tree)
        self.curvedit_fingerprint.__dict__["_owner"] = weakref.ref(self)
        # The original weight while an edit is merged: restoring it is bit-exact in every dtype. Non-persistent:
        # it is the base weight, saved with the base model.
        self.register_buffer("curvedit_original_weight", None, persistent=False)
        self._curvedit_q_side: dict[str, str] = {}
        # Adapters whose buffers hold a computed or loaded edit that matched this layer's base weight. A cache of that
        # check, so that the forward pass never reads a buffer back to the host (a device sync on GPU).
        self._curvedit_verified: set[str] = set()
        # per adapter, the digest its config records (None: built here and not saved yet, or saved by a version that
        # recorded none)
        self._curvedit_digests: dict[str, str | None] = {}
        self._curvedit_module_name = ""  # for error messages; set by update_layer
        self._curvedit_compute_dtype: dict[str, torch.dtype | None] = {}  # None: the base layer's dtype
        # Per (adapter, dtype): the matrices the unmerged forward multiplies by, cast once from the stored factors,
        # with (weak references to) the factors they were made from and their versions: a reload, an in-place load or
        # a device move makes them stale.
        self._curvedit_compute_cache: dict[tuple[str, torch.dtype], tuple] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
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

    # ---- state -------------------------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The unedited weight as a logical ``(d_out, d_in)`` matrix, also while an edit is merged."""
        w = self.curvedit_original_weight if self.merged else self.get_base_layer().weight
        return w.T if self.is_conv1d else w

    def buffer_dtype(self) -> torch.dtype:
        """The dtype edits are stored in on this layer: float64 on a float64 base, float32 otherwise."""
        return torch.float64 if self.get_base_layer().weight.dtype == torch.float64 else torch.float32

    def _get_available_adapters(self) -> set[str]:
        return set(self.curvedit_Q.keys())

    def has_edit(self, adapter_name: str) -> bool:
        """Whether this layer holds (buffers for) the edit `adapter_name`."""
        return adapter_name in self._get_available_adapters()

    def reports(self, adapter_name: str, module_name: str = "") -> list[ModuleEditReport]:
        """The per-target reports of `adapter_name` on this layer (one for a linear layer)."""
        return [self.report(adapter_name, module_name)]

    def _edit_to_run(self) -> str | None:
        """The edit the forward applies, checked; ``None``: the base layer runs as it is (disabled, none active, or
        merged). A merged edit no longer active (transformers' set_adapter) is unmerged: no stale weight runs."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return None
        name = self._active_edit()
        if self.merged:
            if name in self.merged_adapters:
                return None
            self.unmerge()
        if name is not None:
            self._check_ready(name)
        return name

    def _active_edit(self) -> str | None:
        active = [a for a in self.active_adapters if self.has_edit(a)]
        if len(active) > 1:
            raise ValueError(
                f"curvature edits replace the weight, so only one can be active on a layer; got {active}. "
                "Use model.set_adapter(name) with a single adapter name."
            )
        return active[0] if active else None

    def update_layer(self, adapter_name: str, config: Any, module_name: str) -> None:
        """Create adapter `adapter_name` with empty buffers shaped as ``config.edited_modules[module_name]`` records,
        to be filled by `set_edit` or by loading a saved adapter."""
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} is not usable: it must be non-empty and contain no '.'")
        self._curvedit_module_name = module_name
        info = config.edited_modules.get(module_name)
        if info is None and config.edited_modules:
            raise WrongBaseModelError(wrong_base_message(
                adapter_name, module_name,
                f"the saved edit has no entry for this module (it edits {len(config.edited_modules)} modules, "
                f"e.g. {sorted(config.edited_modules)[:3]}), so the architecture differs"))
        if info is None:
            raise ValueError(
                f"cannot build curvature edit '{adapter_name}' for module '{module_name}': no K-FAC factors were "
                "given and the config records no edit for this module. Build it with "
                "hf_curvedit.build_curvature_edit(model, eigen, config) or set config.factors_path to an "
                "eigen.safetensors file; to load a saved edit use PeftModel.from_pretrained(base, adapter_dir)."
            )
        self._curvedit_digests[adapter_name] = info.get("digest")
        edit = CurvatureEdit.empty(self.out_features, self.in_features, int(info["k"]), str(info["q_side"]),
                                   self.buffer_dtype())
        compute_dtype = getattr(config, "compute_dtype", None)
        self._curvedit_compute_dtype[adapter_name] = parse_dtype(compute_dtype) if compute_dtype is not None else None
        self._store(adapter_name, edit)
        self._curvedit_verified.discard(adapter_name)
        self.set_adapter(self.active_adapters)

    def set_edit(self, adapter_name: str, edit: CurvatureEdit) -> None:
        """Fill adapter `adapter_name` with an edit computed from this layer's own base weight."""
        fits = (adapter_name in self.curvedit_Q and tuple(self.curvedit_Q[adapter_name].shape) == tuple(edit.Q.shape)
                and self._curvedit_q_side[adapter_name] == edit.q_side)
        if not fits:
            raise ValueError(f"the edit for '{self._curvedit_module_name}' does not fit the buffers of adapter "
                             f"'{adapter_name}' (Q {tuple(edit.Q.shape)}, {edit.q_side} side)")
        self._store(adapter_name, edit)
        self._curvedit_verified.add(adapter_name)

    def _store(self, adapter_name: str, edit: CurvatureEdit) -> None:
        device = self.get_base_layer().weight.device
        dtype = self.buffer_dtype()
        self.curvedit_Q[adapter_name] = edit.Q.to(device, dtype)
        self.curvedit_B[adapter_name] = edit.B.to(device, dtype)
        self.curvedit_cutoffs[adapter_name] = edit.cutoffs.to(device)
        self.curvedit_meta[adapter_name] = edit.meta.to(device)
        self.curvedit_fingerprint[adapter_name] = edit.fingerprint.to(device)
        self._curvedit_q_side[adapter_name] = edit.q_side
        self._drop_compute_cache(adapter_name)

    def _drop_compute_cache(self, adapter_name: str) -> None:
        for key in [k for k in self._curvedit_compute_cache if k[0] == adapter_name]:
            del self._curvedit_compute_cache[key]

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

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT's default also casts float buffers to the base dtype; the factorization and the fingerprint must stay
        # in float32/float64 (and the cutoffs int64), so only the device moves.
        target = device if device is not None else self.get_base_layer().weight.device
        for name in self.other_param_names:
            store = getattr(self, name)
            if adapter_name in store and store[adapter_name].device != target and target.type != "meta":
                store[adapter_name] = store[adapter_name].to(target)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"curvature edit '{adapter_name}' is merged; call unmerge_adapter() before deleting it")
        super().delete_adapter(adapter_name)
        self._curvedit_q_side.pop(adapter_name, None)
        self._curvedit_compute_dtype.pop(adapter_name, None)
        self._curvedit_digests.pop(adapter_name, None)
        self._curvedit_verified.discard(adapter_name)
        self._drop_compute_cache(adapter_name)

    def edit(self, adapter_name: str) -> CurvatureEdit:
        """The stored edit of `adapter_name` (the buffers themselves, not copies)."""
        self._check_ready(adapter_name)
        return CurvatureEdit(Q=self.curvedit_Q[adapter_name], B=self.curvedit_B[adapter_name],
                             q_side=self._curvedit_q_side[adapter_name], cutoffs=self.curvedit_cutoffs[adapter_name],
                             meta=self.curvedit_meta[adapter_name], fingerprint=self.curvedit_fingerprint[adapter_name])

    def edited_weight(self, adapter_name: str) -> torch.Tensor:
        """``W'`` of `adapter_name` as a logical ``(d_out, d_in)`` matrix in the buffer dtype."""
        return self.edit(adapter_name).dense()

    # ---- checks ------------------------------------------------------------------------------------------------
    def _check_ready(self, adapter_name: str) -> None:
        if adapter_name not in self._curvedit_verified:
            self._verify_loaded_edit(adapter_name)

    def _on_fingerprint_loaded(self, adapter_name: str) -> None:
        # transformers' loader assigns the tensors one by one: the base weight can be checked as soon as the
        # fingerprint is in; the digest waits for the first use, when every tensor is
        if adapter_name in self.curvedit_Q and bool(self.curvedit_fingerprint[adapter_name][0] > 0):
            self.check_base(adapter_name, self._curvedit_module_name)

    def _verify_loaded_edit(self, adapter_name: str) -> None:
        """Accept the edit in the buffers of `adapter_name` once it is filled, matches its recorded digest and belongs
        to this base weight."""
        if adapter_name not in self.curvedit_Q:
            return  # the fingerprint arrived before the update_layer that creates the other stores
        fingerprint = self.curvedit_fingerprint[adapter_name]
        if fingerprint.device.type == "meta" or not bool(fingerprint[0] > 0):
            # an unfilled fingerprint: created from the config alone, nothing loaded yet
            raise RuntimeError(
                f"curvature edit '{adapter_name}' on this layer has no weights yet: it was created from the config "
                "alone and no saved adapter was loaded into it. Load one with PeftModel.from_pretrained / "
                "load_adapter, or build it from factors with hf_curvedit.build_curvature_edit."
            )
        self._check_digest(adapter_name, self.content_tensors(adapter_name))
        self.check_base(adapter_name, self._curvedit_module_name)
        self._curvedit_verified.add(adapter_name)

    def check_base(self, adapter_name: str, module_name: str = "") -> None:
        """Raise `WrongBaseModelError` if the base weight is not the one `adapter_name` was built for."""
        problem = fingerprint_mismatch(self.curvedit_fingerprint[adapter_name], weight_fingerprint(self.base_weight()))
        if problem:
            raise WrongBaseModelError(wrong_base_message(adapter_name, module_name, problem))

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


class CurvatureEditLinear(nn.Module, CurvatureEditLayer):
    """Curvature edit of an `nn.Linear` or GPT-2 `Conv1D`: enabled, ``y = B (Qᵀ x) + b``; disabled, the base layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, module_name: str, **kwargs: Any) -> None:
        super().__init__()
        CurvatureEditLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

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
        name = single_edit_to_merge(self, adapter_names, lambda a: a in self.curvedit_Q)
        if name is None:
            return
        base = self.get_base_layer()
        new = self.edited_weight(name)
        new = (new.T if self.is_conv1d else new).to(base.weight.dtype).contiguous()
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"the edited weight of adapter '{name}' contains NaN or inf; not merging it")
        self.curvedit_original_weight = base.weight.data
        base.weight.data = new
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the original weight back (bit-exact: it is the very tensor that was replaced)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.get_base_layer().weight.data = self.curvedit_original_weight
        self.curvedit_original_weight = None
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W' - W`` in the base layer's storage layout (full rank: the edit is a replacement, not a low-rank
        delta)."""
        base = self.get_base_layer()
        delta = self.edited_weight(adapter_name).to(torch.float32) - self.base_weight().to(torch.float32)
        return (delta.T if self.is_conv1d else delta).to(base.weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        # PEFT's loading path. Runs before the children (the BufferDicts) load, so a wrong base is reported here with a
        # clear message instead of a size-mismatch error, and buffers whose rank differs from the config are resized.
        for name in list(self.curvedit_Q.keys()):
            fp_key = f"{prefix}curvedit_fingerprint.{name}"
            if fp_key not in state_dict:
                continue
            incoming = {store: state_dict.get(f"{prefix}{store}.{name}") for store in self.other_param_names}
            if all(t is not None for t in incoming.values()):
                self._check_digest(name, self.content_tensors(name, incoming))
            problem = fingerprint_mismatch(state_dict[fp_key], weight_fingerprint(self.base_weight()))
            if problem:
                raise WrongBaseModelError(wrong_base_message(name, self._curvedit_module_name, problem))
            for store_name in self.other_param_names:
                key = f"{prefix}{store_name}.{name}"
                store = getattr(self, store_name)
                if key in state_dict and state_dict[key].shape != store[name].shape:
                    store[name] = torch.empty(state_dict[key].shape, dtype=store[name].dtype, device=store[name].device)
            meta_key = f"{prefix}curvedit_meta.{name}"
            if meta_key in state_dict:
                self._curvedit_q_side[name] = q_side_of(state_dict[meta_key])
            self._curvedit_verified.add(name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __repr__(self) -> str:
        return "curvedit." + super().__repr__()
