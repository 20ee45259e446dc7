"""`CurvatureEditLayer`: what every curvature-edit layer shares (its units' stores, loading, the checks of a loaded
edit, which edit runs). The layers themselves are `CurvatureEditLinear` (`linear.py`) and `CurvatureEditExperts`
(`experts.py`).

A layer stores, per adapter and unit (`stores.py`), the factorization of an edit computed by `hf_curvedit.edit` (see
docs/method.md), and applies, merges or disables it. It knows nothing about factors, ρ or target patterns: the model
(`build.py`) computes edits and hands them over, or loading fills the buffers.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..curvature.distributed import full_weight
from ..edit import fingerprint_mismatch, weight_fingerprint
from ..errors import InputError
from ..utils import parse_dtype
from .stores import (
    DamagedAdapterError,
    FingerprintStore,
    PinnedDtypeBufferDict,
    WrongBaseModelError,
    damaged_message,
    digest_problem,
    digest_record,
    store_name,
    unit_stores,
    wrong_base_message,
)

# the errors stay importable from here, where they were before the stores had their own module
__all__ = ["CurvatureEditLayer", "DamagedAdapterError", "WrongBaseModelError", "single_edit_to_merge"]


def single_edit_to_merge(layer: BaseTunerLayer, adapter_names: list[str] | None, has_edit: Any) -> str | None:
    """The one edit of ``layer`` to merge (None if there is none): curvature edits replace the weight, so merging
    two, or one on top of another, has no meaning."""
    names = [a for a in check_adapters_to_merge(layer, adapter_names) if has_edit(a)]
    if not names:
        return None
    if len(names) > 1 or layer.merged:
        raise InputError(
            f"curvature edits replace the weight, so only one can be merged at a time (asked for {names}, "
            f"already merged {layer.merged_adapters}); unmerge first"
        )
    return names[0]


class CurvatureEditLayer(nn.Module, BaseTunerLayer):
    """What every curvature-edit layer shares (PEFT's ``tuner_layer_cls``): per adapter and unit (a weight it
    replaces, see `hf_curvedit.tuner.stores`), the stores of its edit as persistent buffers; the record of what was
    saved (digests, dtype); the checks of a loaded edit (its tensors, their digests, the base weight it was built
    for); loading, device moves and deletion.

    Everything is a buffer (never a parameter: the edit is fixed) kept in the dtype it was built or saved in, whatever
    dtype the base model is cast to. Subclasses say which units they have (`candidate_units`), what a unit's base
    weight is (`base_weight`), how an edit becomes store tensors (`_edit_tensors`, `_empty_tensors`), and the forward
    and merge.
    """

    # No trainable adapter weights: PEFT toggles requires_grad on `adapter_layer_names`, which must not touch buffers.
    adapter_layer_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, module_name: str, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.other_param_names: tuple[str, ...] = ()
        self._curvedit_units: list[str] = []
        # per (adapter, unit), what the config records of the saved edit (its digests and dtype; empty for an edit
        # built here and not saved yet)
        self._curvedit_records: dict[tuple[str, str], Mapping[str, Any]] = {}
        # (adapter, unit) whose buffers hold a computed or loaded edit that passed every check: a cache of those
        # checks, so that the forward pass never reads a buffer back to the host (a device sync on GPU)
        self._curvedit_verified: set[tuple[str, str]] = set()
        self._curvedit_module_name = module_name  # for error messages
        self._curvedit_source: str | None = None  # where the adapter was loaded from, when the loader says
        self._curvedit_compute_dtype: dict[str, torch.dtype | None] = {}  # None: the base layer's dtype
        # per (adapter, ...): what the unmerged forward multiplies by, cast once from the stored factors, with (weak
        # references to) the tensors it was made from and their versions: a reload or a device move makes it stale
        self._curvedit_compute_cache: dict[tuple, tuple] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

    # ---- units -------------------------------------------------------------------------------------------------
    def candidate_units(self) -> list[str]:
        """The units this layer can edit, in forward order (``[""]`` for a linear layer)."""
        raise NotImplementedError

    def base_weight(self, unit: str = "") -> torch.Tensor:
        """The unedited weight of ``unit`` in its logical layout (``(d_out, d_in)``, or ``(experts, d_out, d_in)``),
        also while an edit is merged."""
        raise NotImplementedError

    def unit_name(self, unit: str, module_name: str | None = None) -> str:
        """The name of a unit's entry in ``edited_modules``: the module's name, plus ``.<parameter>`` for an expert
        projection."""
        module = self._curvedit_module_name if module_name is None else module_name
        return f"{module}.{unit}" if unit else module

    def units_of(self, adapter_name: str) -> list[str]:
        """The units the edit `adapter_name` replaces on this layer."""
        return [u for u in self._curvedit_units if adapter_name in self._store(u, unit_stores(u)[0])]

    def _store(self, unit: str, name: str) -> PinnedDtypeBufferDict:
        return getattr(self, name)

    def _add_unit(self, unit: str) -> None:
        if unit in self._curvedit_units:
            return
        for name in unit_stores(unit):
            if name == store_name("fingerprint", unit):
                store = FingerprintStore({}, persistent=True)
                # a weak reference: a strong one would be registered as a child module (a cycle in the module tree)
                store.__dict__["_owner"] = weakref.ref(self)
                store.__dict__["_unit"] = unit
            else:
                store = PinnedDtypeBufferDict({}, persistent=True)
            setattr(self, name, store)
        self._curvedit_units = [u for u in self.candidate_units() if u in self._curvedit_units or u == unit]
        self.other_param_names = tuple(s for u in self._curvedit_units for s in unit_stores(u))

    def _get_available_adapters(self) -> set[str]:
        return {a for u in self._curvedit_units for a in self._store(u, unit_stores(u)[0]).keys()}

    def has_edit(self, adapter_name: str) -> bool:
        """Whether this layer holds (buffers for) the edit `adapter_name`."""
        return bool(self.units_of(adapter_name))

    def buffer_dtype(self) -> torch.dtype:
        """The dtype a new edit is stored in on this layer: float64 on a float64 base, float32 otherwise."""
        dtype = self.base_weight(self.candidate_units()[0]).dtype
        return torch.float64 if dtype == torch.float64 else torch.float32

    # ---- creating and filling edits ----------------------------------------------------------------------------
    def _empty_tensors(self, unit: str, info: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """All-zero store tensors shaped as the entry ``info`` records, to be filled by loading."""
        raise NotImplementedError

    def _edit_tensors(self, unit: str, edit: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The store tensors of a computed edit."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config: Any, module_name: str) -> None:
        """Create adapter `adapter_name` with empty stores shaped as ``config.edited_modules`` records for each of this
        layer's units, to be filled by `set_edit` or by loading a saved adapter."""
        if not adapter_name or "." in adapter_name:
            raise InputError(f"adapter name {adapter_name!r} is not usable: it must be non-empty and contain no '.'")
        self._curvedit_module_name = module_name
        self._curvedit_source = getattr(config, "_curvedit_source", None)
        entries = {u: config.edited_modules.get(self.unit_name(u)) for u in self.candidate_units()}
        entries = {u: info for u, info in entries.items() if info is not None}
        if not entries and config.edited_modules:
            raise WrongBaseModelError(wrong_base_message(
                adapter_name, module_name,
                f"the saved edit has no entry for this module (it edits {len(config.edited_modules)} weights, e.g. "
                f"{sorted(config.edited_modules)[:3]}), so the architecture differs"))
        if not entries:
            raise InputError(
                f"cannot build curvature edit '{adapter_name}' for module '{module_name}': no K-FAC factors were "
                "given and the config records no edit for this module. Build it with "
                "hf_curvedit.build_curvature_edit(model, eigen, config) or set config.factors_path to an "
                "eigen store (its folder, eigen.safetensors or its index); to load a saved edit use "
                "PeftModel.from_pretrained(base, adapter_dir)."
            )
        for unit, info in entries.items():
            self._add_unit(unit)
            self._curvedit_records[(adapter_name, unit)] = info
            dtype = parse_dtype(info["dtype"]) if info.get("dtype") else self.buffer_dtype()
            device = self.base_weight(unit).device
            for name, t in self._empty_tensors(unit, info, dtype).items():
                store = self._store(unit, name)
                store[adapter_name] = t.to(device)
                store.assigned.discard(adapter_name)
            self._curvedit_verified.discard((adapter_name, unit))
        compute_dtype = getattr(config, "compute_dtype", None)
        self._curvedit_compute_dtype[adapter_name] = parse_dtype(compute_dtype) if compute_dtype is not None else None
        self._drop_compute_cache(adapter_name)
        self.set_adapter(self.active_adapters)

    def set_edit(self, adapter_name: str, edit: Any, unit: str = "") -> None:
        """Fill the stores of `unit` of adapter `adapter_name` with an edit computed from this layer's own base weight
        (a `CurvatureEdit` for a linear layer, an `ExpertsEdit` for an expert projection)."""
        stores = unit_stores(unit)
        if unit not in self.units_of(adapter_name):
            raise InputError(f"adapter '{adapter_name}' has no stores for {self.unit_name(unit)}")
        first = self._store(unit, stores[0])[adapter_name]
        dtype = first.dtype
        tensors = self._edit_tensors(unit, edit, dtype)
        wrong = [n for n, t in tensors.items() if t.shape != self._store(unit, n)[adapter_name].shape]
        if wrong:
            raise InputError(f"the edit for '{self.unit_name(unit)}' does not fit the buffers of adapter "
                             f"'{adapter_name}' ({wrong[0]}: {tuple(tensors[wrong[0]].shape)})")
        for name, t in tensors.items():
            self._store(unit, name)[adapter_name] = t.to(first.device)
        self._curvedit_verified.add((adapter_name, unit))
        self._drop_compute_cache(adapter_name)

    def record_digests(self, adapter_name: str) -> dict[str, dict[str, Any]]:
        """The digest record (`hf_curvedit.tuner.stores.digest_record`) of each unit of `adapter_name` as this layer
        holds it, by entry name; also kept as what later checks compare against."""
        out = {}
        for unit in self.units_of(adapter_name):
            record = digest_record(self.content_tensors(adapter_name, unit))
            self._curvedit_records[(adapter_name, unit)] = record
            out[self.unit_name(unit)] = record
        return out

    def content_tensors(self, adapter_name: str, unit: str = "") -> list[tuple[str, torch.Tensor]]:
        """The tensors of `unit` of `adapter_name` that its digests cover, by store name."""
        return [(name, self._store(unit, name)[adapter_name]) for name in unit_stores(unit)]

    def _drop_compute_cache(self, adapter_name: str) -> None:
        for key in [k for k in self._curvedit_compute_cache if k[0] == adapter_name]:
            del self._curvedit_compute_cache[key]

    # ---- checks ------------------------------------------------------------------------------------------------
    def _damaged(self, adapter_name: str, unit: str, problem: str) -> DamagedAdapterError:
        return DamagedAdapterError(damaged_message(adapter_name, self.unit_name(unit), problem, self._curvedit_source))

    def _check_ready(self, adapter_name: str) -> None:
        if any((adapter_name, u) not in self._curvedit_verified for u in self.units_of(adapter_name)):
            self._verify_loaded_edit(adapter_name)

    def _on_fingerprint_loaded(self, adapter_name: str, unit: str) -> None:
        # transformers' loader assigns the tensors one by one: the base weight can be checked as soon as the
        # fingerprint is in; the digests wait for the first use, when every tensor is
        if unit in self.units_of(adapter_name):
            fingerprint = self._store(unit, store_name("fingerprint", unit))[adapter_name]
            if _filled(fingerprint):
                self._check_unit_base(adapter_name, unit, fingerprint)

    def _verify_loaded_edit(self, adapter_name: str) -> None:
        """Accept the loaded edit `adapter_name` once every unit's tensors are in, match their recorded digests and
        belong to this base weight."""
        for unit in self.units_of(adapter_name):
            if (adapter_name, unit) in self._curvedit_verified:
                continue
            fingerprint = self._store(unit, store_name("fingerprint", unit))[adapter_name]
            if fingerprint.device.type == "meta" or not _filled(fingerprint):
                raise RuntimeError(
                    f"curvature edit '{adapter_name}' of {self.unit_name(unit)} has no weights yet: it was created "
                    "from the config alone and no saved adapter was loaded into it. Load one with "
                    "PeftModel.from_pretrained / load_adapter, or build it from factors with "
                    "hf_curvedit.build_curvature_edit."
                )
            # only a loader that assigns tensors gets here (PEFT's checks in _load_from_state_dict): what it did not
            # assign, the file did not hold
            tensors = {n: (self._store(unit, n)[adapter_name] if adapter_name in self._store(unit, n).assigned
                           else None) for n in unit_stores(unit)}
            self._check_loaded(adapter_name, unit, tensors)
            self._curvedit_verified.add((adapter_name, unit))

    def _check_loaded(self, adapter_name: str, unit: str, tensors: Mapping[str, torch.Tensor | None]) -> None:
        """Refuse a loaded unit whose tensors are missing or do not match its recorded digests, or that was built for
        another base weight."""
        problem = digest_problem(self._curvedit_records.get((adapter_name, unit), {}), tensors)
        if problem:
            raise self._damaged(adapter_name, unit, problem)
        self._check_unit_base(adapter_name, unit, tensors[store_name("fingerprint", unit)])  # type: ignore[arg-type]

    def _check_unit_base(self, adapter_name: str, unit: str, fingerprints: torch.Tensor) -> None:
        weight = full_weight(self.base_weight(unit))
        experts = weight.dim() == 3
        weights, rows = (weight, fingerprints) if experts else (weight[None], fingerprints[None])
        where = self.unit_name(unit)
        if rows.shape[0] != weights.shape[0]:
            raise WrongBaseModelError(wrong_base_message(
                adapter_name, where, f"the module has {weights.shape[0]} experts, the adapter was built for "
                f"{rows.shape[0]}"))
        for e in range(weights.shape[0]):
            problem = fingerprint_mismatch(rows[e], weight_fingerprint(weights[e]))
            if problem:
                raise WrongBaseModelError(wrong_base_message(adapter_name, where,
                                                             f"expert {e}: {problem}" if experts else problem))

    def check_base(self, adapter_name: str, module_name: str = "") -> None:
        """Raise `WrongBaseModelError` naming the weight (and expert) that is not the one `adapter_name` was built
        for."""
        for unit in self.units_of(adapter_name):
            self._check_unit_base(adapter_name, unit, self._store(unit, store_name("fingerprint", unit))[adapter_name])

    def _after_load(self, adapter_name: str, unit: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """What a subclass learns from a unit's loaded tensors (before they are copied into its stores)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        # PEFT's loading path. Runs before the children (the stores) load: a damaged, incomplete or wrong-base edit is
        # refused here with a clear message, and stores whose shape differs from the config are resized.
        for adapter_name in sorted(self._get_available_adapters()):
            for unit in self.units_of(adapter_name):
                incoming = {n: state_dict.get(f"{prefix}{n}.{adapter_name}") for n in unit_stores(unit)}
                if all(t is None for t in incoming.values()):
                    continue
                self._check_loaded(adapter_name, unit, incoming)
                for name, t in incoming.items():
                    store = self._store(unit, name)
                    if t.shape != store[adapter_name].shape:  # type: ignore[union-attr]
                        store[adapter_name] = torch.empty(t.shape, dtype=store[adapter_name].dtype,  # type: ignore
                                                          device=store[adapter_name].device)
                self._after_load(adapter_name, unit, incoming)  # type: ignore[arg-type]
                self._curvedit_verified.add((adapter_name, unit))
            self._drop_compute_cache(adapter_name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- which edit runs ------------------------------------------------------------------------------------
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
            raise InputError(
                f"curvature edits replace the weight, so only one can be active on a layer; got {active}. "
                "Use model.set_adapter(name) with a single adapter name."
            )
        return active[0] if active else None

    # ---- device moves, deletion --------------------------------------------------------------------------------
    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT's default also casts float buffers to the base dtype; the factorization and the fingerprint must stay
        # in their own dtype (and the cutoffs int64), so only the device moves.
        for unit in self.units_of(adapter_name):
            target = device if device is not None else self.base_weight(unit).device
            for name in unit_stores(unit):
                store = self._store(unit, name)
                if store[adapter_name].device != target and target.type != "meta":
                    store[adapter_name] = store[adapter_name].to(target)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise InputError(f"curvature edit '{adapter_name}' is merged; call unmerge_adapter() before deleting it")
        units = self.units_of(adapter_name)
        BaseTunerLayer.delete_adapter(self, adapter_name)
        for unit in units:
            self._curvedit_records.pop((adapter_name, unit), None)
            self._curvedit_verified.discard((adapter_name, unit))
        self._curvedit_compute_dtype.pop(adapter_name, None)
        self._drop_compute_cache(adapter_name)

    def __repr__(self) -> str:
        return "curvedit." + super().__repr__()


def _filled(fingerprint: torch.Tensor) -> bool:
    # a loaded fingerprint records d_out > 0 (of every expert); the empty one created from the config is all zero
    return bool((fingerprint[..., 0] > 0).all())
