"""The curvature edit of a fused experts module: each targeted 3D projection is replaced, expert by expert.

transformers 5 keeps a mixture-of-experts layer's projections as 3D parameters of one experts module (see
`hf_curvedit.targets.is_experts_module`). Like PEFT's ``ParamWrapper`` (LoRA's ``target_parameters``), this layer wraps
that module and substitutes the edited parameter during its forward, so every experts kernel transformers may pick
(eager, grouped or batched matmul) runs the edit. Per adapter and targeted parameter it stores the stacked, zero-padded
factors ``W'_e = out_e in_eᵀ`` of `hf_curvedit.edit.ExpertsEdit`, each expert's statistics and fingerprint, and the
tokens each expert's factors saw. An unedited (under-sampled) expert keeps its base matrix bit for bit.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..edit import (
    FINGERPRINT_SIZE,
    META_FIELDS,
    ExpertsEdit,
    ModuleEditReport,
    expert_is_edited,
    fingerprint_mismatch,
    weight_fingerprint,
)
from ..targets import expert_parameter_names, is_experts_module
from .layer import CurvatureEditLayer, single_edit_to_merge
from .stores import (
    DamagedAdapterError,
    FingerprintStore,
    PinnedDtypeBufferDict,
    WrongBaseModelError,
    canonical_digest,
    damaged_message,
    wrong_base_message,
)

__all__ = ["CurvatureEditExperts"]

# per targeted parameter p, the stores are named f"curvedit_{kind}_{p}"
_KINDS = ("out", "in", "meta", "fingerprint", "cutoffs", "tokens")


class CurvatureEditExperts(nn.Module, CurvatureEditLayer):
    """Curvature edits of the expert projections (``gate_up_proj``/``up_proj``, ``down_proj``) of an experts module.

    Enabled, the forward runs the wrapped module with each edited parameter replaced by ``W'`` (dense, cast once to the
    parameter's dtype and cached until the adapter or the base weight changes: the unmerged edit holds one extra copy
    of each edited stack; merge it to avoid that). Disabled, the wrapped module runs untouched.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, module_name: str, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        if not is_experts_module(base_layer):
            raise TypeError(f"{type(base_layer).__name__} is not a fused experts module")
        self.base_layer = base_layer
        self.other_param_names: tuple[str, ...] = ()
        self._curvedit_params: list[str] = []
        # the original parameters while an edit is merged (bit-exact unmerge); not saved: they are the base weights
        self.curvedit_original = PinnedDtypeBufferDict({}, persistent=False)
        self._curvedit_verified: set[str] = set()
        self._curvedit_verified_params: set[tuple[str, str]] = set()
        self._curvedit_digests: dict[tuple[str, str], str | None] = {}  # (adapter, parameter) -> recorded digest
        self._curvedit_module_name = module_name
        self._curvedit_compute_cache: dict[tuple, tuple] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    # ---- stores --------------------------------------------------------------------------------------------------
    def _store_of(self, kind: str, param: str) -> PinnedDtypeBufferDict:
        return getattr(self, f"curvedit_{kind}_{param}")

    def _add_param(self, param: str) -> None:
        if param in self._curvedit_params:
            return
        for kind in _KINDS:
            store = FingerprintStore({}, persistent=True) if kind == "fingerprint" else \
                PinnedDtypeBufferDict({}, persistent=True)
            if kind == "fingerprint":
                store.__dict__["_owner"] = weakref.ref(self)
                store.__dict__["_owner_args"] = (param,)
            setattr(self, f"curvedit_{kind}_{param}", store)
        self._curvedit_params = [p for p in expert_parameter_names(self.base_layer)
                                 if p in self._curvedit_params or p == param]
        self.other_param_names = tuple(f"curvedit_{k}_{p}" for p in self._curvedit_params for k in _KINDS)

    def params_of(self, adapter_name: str) -> list[str]:
        """The parameters adapter `adapter_name` edits on this module."""
        return [p for p in self._curvedit_params if adapter_name in self._store_of("out", p)]

    def _get_available_adapters(self) -> set[str]:
        return {a for p in self._curvedit_params for a in self._store_of("out", p).keys()}

    def base_weight(self, param: str) -> torch.Tensor:
        """The unedited ``(experts, d_out, d_in)`` weight of `param` (logical layout), also while merged."""
        w = self.curvedit_original[param] if param in self.curvedit_original else getattr(self.base_layer, param)
        return w.transpose(-1, -2) if self.base_layer.is_transposed else w

    def buffer_dtype(self) -> torch.dtype:
        dtype = getattr(self.base_layer, self._curvedit_params[0] if self._curvedit_params else "down_proj").dtype
        return torch.float64 if dtype == torch.float64 else torch.float32

    def update_layer(self, adapter_name: str, config: Any, module_name: str) -> None:
        """Create adapter `adapter_name` with empty stores shaped as ``config.edited_modules`` records for each of this
        module's parameters, to be filled by `set_edit` or by loading a saved adapter."""
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} is not usable: it must be non-empty and contain no '.'")
        self._curvedit_module_name = module_name
        entries = {p: config.edited_modules.get(f"{module_name}.{p}") for p in expert_parameter_names(self.base_layer)}
        entries = {p: info for p, info in entries.items() if info is not None}
        if not entries:
            if config.edited_modules:
                raise WrongBaseModelError(wrong_base_message(
                    adapter_name, module_name,
                    f"the saved edit has no entry for this experts module (it edits {len(config.edited_modules)} "
                    f"weights, e.g. {sorted(config.edited_modules)[:3]}), so the architecture differs"))
            raise ValueError(
                f"cannot build curvature edit '{adapter_name}' for '{module_name}': no K-FAC factors were given and "
                "the config records no edit for it. Build it with hf_curvedit.build_curvature_edit(model, eigen, "
                "config) or set config.factors_path; to load a saved edit use "
                "PeftModel.from_pretrained(base, adapter_dir)."
            )
        for p, info in entries.items():
            self._add_param(p)
            self._curvedit_digests[(adapter_name, p)] = info.get("digest")
            weight = self.base_weight(p)
            num, d_out, d_in = weight.shape
            k = int(info["k"])
            dtype, device = self.buffer_dtype(), weight.device
            empty = {
                "out": torch.zeros(num, d_out, k, dtype=dtype), "in": torch.zeros(num, d_in, k, dtype=dtype),
                "meta": torch.zeros(num, len(META_FIELDS), dtype=torch.float64),
                "fingerprint": torch.zeros(num, FINGERPRINT_SIZE, dtype=torch.float64),
                "cutoffs": torch.zeros(num, d_out, dtype=torch.int64),
                "tokens": torch.zeros(num, dtype=torch.int64),
            }
            for kind, t in empty.items():
                self._store_of(kind, p)[adapter_name] = t.to(device)
            self._curvedit_verified_params.discard((adapter_name, p))
        self._curvedit_verified.discard(adapter_name)
        self._drop_compute_cache(adapter_name)
        self.set_adapter(self.active_adapters)

    def set_edit(self, adapter_name: str, edits: dict[str, ExpertsEdit]) -> None:
        """Fill adapter `adapter_name` with edits (parameter name → `ExpertsEdit`) computed from this module's own
        weights."""
        for p, edit in edits.items():
            if adapter_name not in self._store_of("out", p) or self._store_of("out", p)[adapter_name].shape[-1] \
                    != edit.rank:
                raise ValueError(f"the edit for '{self._curvedit_module_name}.{p}' does not fit the buffers of "
                                 f"adapter '{adapter_name}' (rank {edit.rank})")
            device, dtype = self.base_weight(p).device, self.buffer_dtype()
            out, inp, cutoffs = edit.stacked(dtype)
            values = {"out": out, "in": inp, "meta": edit.meta, "fingerprint": edit.fingerprint, "cutoffs": cutoffs,
                      "tokens": edit.num_tokens}
            for kind, t in values.items():
                self._store_of(kind, p)[adapter_name] = t.to(device)
            self._curvedit_verified_params.add((adapter_name, p))
        self._drop_compute_cache(adapter_name)
        if all((adapter_name, p) in self._curvedit_verified_params for p in self.params_of(adapter_name)):
            self._curvedit_verified.add(adapter_name)

    def _drop_compute_cache(self, adapter_name: str) -> None:
        for key in [k for k in self._curvedit_compute_cache if k[0] == adapter_name]:
            del self._curvedit_compute_cache[key]

    # ---- checks --------------------------------------------------------------------------------------------------
    def content_tensors(self, adapter_name: str, param: str,  # type: ignore[override]
                        stores: Any = None) -> list[tuple[str, torch.Tensor]]:
        """The tensors of `param` of `adapter_name` that its digest covers (as `CurvatureEditLayer.content_tensors`)."""
        names = [f"curvedit_{kind}_{param}" for kind in _KINDS]
        get = (lambda name: getattr(self, name)[adapter_name]) if stores is None else stores.__getitem__
        return [(name, get(name)) for name in names]

    def content_digest(self, adapter_name: str, param: str) -> str:  # type: ignore[override]
        return canonical_digest(self.content_tensors(adapter_name, param))

    def _check_digest(self, adapter_name: str, param: str,  # type: ignore[override]
                      tensors: list[tuple[str, torch.Tensor]]) -> None:
        want = self._curvedit_digests.get((adapter_name, param))
        if want is not None and canonical_digest(tensors) != want:
            raise DamagedAdapterError(damaged_message(adapter_name, f"{self._curvedit_module_name}.{param}"))

    def _on_fingerprint_loaded(self, adapter_name: str, param: str) -> None:  # type: ignore[override]
        fingerprint = self._store_of("fingerprint", param)[adapter_name]
        if adapter_name in self._store_of("out", param) and bool((fingerprint[:, 0] > 0).all()):
            self._check_param(adapter_name, param, fingerprint)

    def _verify_loaded_edit(self, adapter_name: str, param: str | None = None) -> None:
        """Accept the loaded edit of `param` (every parameter when ``None``) of `adapter_name` once it is filled,
        matches its recorded digest and belongs to this module's base weights."""
        for p in [param] if param is not None else self.params_of(adapter_name):
            store = self._store_of("fingerprint", p)
            if adapter_name not in store or adapter_name not in self._store_of("out", p):
                continue  # the fingerprint arrived before update_layer created the other stores
            fingerprint = store[adapter_name]
            if fingerprint.device.type == "meta" or not bool((fingerprint[:, 0] > 0).all()):
                raise RuntimeError(
                    f"curvature edit '{adapter_name}' of {self._curvedit_module_name}.{p} has no weights yet: it was "
                    "created from the config alone and no saved adapter was loaded into it. Load one with "
                    "PeftModel.from_pretrained / load_adapter, or build it from factors with "
                    "hf_curvedit.build_curvature_edit."
                )
            self._check_digest(adapter_name, p, self.content_tensors(adapter_name, p))
            self._check_param(adapter_name, p, fingerprint)
            self._curvedit_verified_params.add((adapter_name, p))
        if all((adapter_name, p) in self._curvedit_verified_params for p in self.params_of(adapter_name)):
            self._curvedit_verified.add(adapter_name)

    def _check_param(self, adapter_name: str, param: str, fingerprints: torch.Tensor) -> None:
        weight = self.base_weight(param)
        if fingerprints.shape[0] != weight.shape[0]:
            raise WrongBaseModelError(wrong_base_message(
                adapter_name, f"{self._curvedit_module_name}.{param}",
                f"the module has {weight.shape[0]} experts, the adapter was built for {fingerprints.shape[0]}"))
        for e in range(weight.shape[0]):
            problem = fingerprint_mismatch(fingerprints[e], weight_fingerprint(weight[e]))
            if problem:
                raise WrongBaseModelError(wrong_base_message(
                    adapter_name, f"{self._curvedit_module_name}.{param}", f"expert {e}: {problem}"))

    def check_base(self, adapter_name: str, module_name: str = "") -> None:
        """Raise `WrongBaseModelError` naming the parameter and expert whose weight is not the one the edit was built
        for."""
        for p in self.params_of(adapter_name):
            self._check_param(adapter_name, p, self._store_of("fingerprint", p)[adapter_name])

    def reports(self, adapter_name: str, module_name: str = "") -> list[ModuleEditReport]:
        """One report per edited parameter (see `ModuleEditReport.from_expert_meta`)."""
        self._check_ready(adapter_name)
        name = module_name or self._curvedit_module_name
        out = []
        for p in self.params_of(adapter_name):
            weight = getattr(self.base_layer, p)
            _, d_out, d_in = self.base_weight(p).shape
            factors = (self._store_of("out", p)[adapter_name], self._store_of("in", p)[adapter_name])
            out.append(ModuleEditReport.from_expert_meta(
                self._store_of("meta", p)[adapter_name], self._store_of("tokens", p)[adapter_name],
                module=f"{name}.{p}", adapter=adapter_name, d_out=d_out, d_in=d_in,
                adapter_bytes=sum(t.numel() * t.element_size() for t in factors),
                weight_bytes=weight.numel() * weight.element_size()))
        return out

    def report(self, adapter_name: str, module_name: str = "") -> ModuleEditReport:
        raise TypeError("an experts module has one report per edited parameter; use reports()")

    # ---- the edited weights --------------------------------------------------------------------------------------
    def edited_weight(self, adapter_name: str, param: str) -> torch.Tensor:
        """``W'`` of `param` as a logical ``(experts, d_out, d_in)`` stack in the buffer dtype; unedited experts are
        their base matrices."""
        self._check_ready(adapter_name)
        out, inp = self._store_of("out", param)[adapter_name], self._store_of("in", param)[adapter_name]
        edited = expert_is_edited(self._store_of("meta", param)[adapter_name]).to(out.device)
        dense = torch.bmm(out, inp.mT)
        base = self.base_weight(param).to(dense.dtype)
        return torch.where(edited[:, None, None], dense, base)

    def _edited_parameter(self, adapter_name: str, param: str) -> torch.Tensor:
        # W' in the parameter's storage layout and dtype, cached with (weak references to) what it was made from
        stores = [self._store_of(k, param)[adapter_name] for k in ("out", "in", "meta")]
        base = getattr(self.base_layer, param)
        key = (adapter_name, param)
        cached = self._curvedit_compute_cache.get(key)
        sources = stores + [base]
        if cached is not None and all(r() is t and v == t._version for (r, v), t in zip(cached[0], sources)):
            return cached[1]
        with torch.no_grad():
            w = self.edited_weight(adapter_name, param)
            w = (w.transpose(-1, -2) if self.base_layer.is_transposed else w).to(base.dtype).contiguous()
        self._curvedit_compute_cache[key] = ([(weakref.ref(t), t._version) for t in sources], w)
        return w

    # ---- forward, merge ------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._edit_to_run()
        if name is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        edited = {p: self._edited_parameter(name, p) for p in self.params_of(name)}
        return torch.func.functional_call(self.base_layer, edited, (hidden_states, *args), kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Replace each edited parameter by ``W'`` of the (single) active edit; the originals are kept for `unmerge`."""
        name = single_edit_to_merge(self, adapter_names, self.has_edit)
        if name is None:
            return
        new = {p: self._edited_parameter(name, p) for p in self.params_of(name)}
        if safe_merge and not all(torch.isfinite(w).all() for w in new.values()):
            raise ValueError(f"the edited weights of adapter '{name}' contain NaN or inf; not merging them")
        for p, w in new.items():
            param = getattr(self.base_layer, p)
            self.curvedit_original[p] = param.data
            param.data = w.clone()
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put the original parameters back (bit-exact: they are the very tensors that were replaced)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        for p in list(self.curvedit_original.keys()):
            getattr(self.base_layer, p).data = self.curvedit_original[p]
            del self.curvedit_original[p]
        self.merged_adapters.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"curvature edit '{adapter_name}' is merged; call unmerge_adapter() before deleting it")
        BaseTunerLayer.delete_adapter(self, adapter_name)
        self._curvedit_digests = {k: v for k, v in self._curvedit_digests.items() if k[0] != adapter_name}
        self._curvedit_verified.discard(adapter_name)
        self._curvedit_verified_params = {k for k in self._curvedit_verified_params if k[0] != adapter_name}
        self._drop_compute_cache(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        target = device if device is not None else getattr(self.base_layer, self._curvedit_params[0]).device
        for attr in self.other_param_names:
            store = getattr(self, attr)
            if adapter_name in store and store[adapter_name].device != target and target.type != "meta":
                store[adapter_name] = store[adapter_name].to(target)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        # PEFT's loading path: a wrong base is reported here (per expert) before the stores load, and stores whose
        # rank differs from the config are resized.
        for name in sorted(self._get_available_adapters()):
            for p in self.params_of(name):
                fp_key = f"{prefix}curvedit_fingerprint_{p}.{name}"
                if fp_key not in state_dict:
                    continue
                incoming = {f"curvedit_{kind}_{p}": state_dict.get(f"{prefix}curvedit_{kind}_{p}.{name}")
                            for kind in _KINDS}
                if all(t is not None for t in incoming.values()):
                    self._check_digest(name, p, self.content_tensors(name, p, incoming))
                self._check_param(name, p, state_dict[fp_key])
                for kind in _KINDS:
                    key, store = f"{prefix}curvedit_{kind}_{p}.{name}", self._store_of(kind, p)
                    if key in state_dict and state_dict[key].shape != store[name].shape:
                        store[name] = torch.empty(state_dict[key].shape, dtype=store[name].dtype,
                                                  device=store[name].device)
                self._curvedit_verified_params.add((name, p))
            self._drop_compute_cache(name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in self._get_available_adapters():
            if all((name, p) in self._curvedit_verified_params for p in self.params_of(name)):
                self._curvedit_verified.add(name)

    def __repr__(self) -> str:
        return "curvedit." + super().__repr__()

