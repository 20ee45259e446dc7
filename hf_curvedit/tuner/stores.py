"""What the curvature-edit layers keep their edits in, and the errors a wrong or damaged edit raises: buffer stores
whose dtype a model cast does not change, the fingerprint store that checks a loaded edit against its base, and the
digests that check a loaded edit's tensors.

An edit's **unit** is one weight it replaces: the weight of a linear layer (unit ``""``), or one projection of an
experts module (unit = the parameter's name, ``"gate_up_proj"``). Each unit has one entry in the config's
``edited_modules`` (keyed by the module name, plus ``.<parameter>`` for an expert projection) and a fixed set of
stores (`unit_stores`), each a `PinnedDtypeBufferDict` of adapter name → tensor.

**Digests.** A saved entry records the digest of each of its unit's tensors, in the dtype it is stored in
(``"tensors": {store: digest}``), so a flipped last bit of a float64 tensor counts, a missing tensor is named, and the
layer allocates its buffers in that dtype (``"dtype"``) so that no loader casts a tensor before it is checked.
Adapters saved before that record one digest per entry of its tensors cast to float32 (``"digest"``, still checked);
adapters saved before digests existed record none, and load with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict

from ..errors import InputError
from ..integrity import digest_of, tensor_digest

__all__ = ["DamagedAdapterError", "FingerprintStore", "PinnedDtypeBufferDict", "WrongBaseModelError",
           "canonical_digest", "damaged_message", "digest_problem", "digest_record", "entry_stores", "store_name",
           "unit_stores", "warn_if_unchecked", "wrong_base_message"]

# the kinds of store of a unit: a linear layer's factorization W' = B Qᵀ (or Q Bᵀ), and an expert projection's
# stacked per-expert factors W'_e = out_e in_eᵀ; both with the staircase cutoffs, statistics and base fingerprint
LINEAR_KINDS = ("Q", "B", "cutoffs", "meta", "fingerprint")
EXPERTS_KINDS = ("out", "in", "meta", "fingerprint", "cutoffs", "tokens")
# the keys under which PEFT saves a layer's tensors (the file has no adapter name in them)
FILE_PREFIX = "base_model.model."


class WrongBaseModelError(InputError):
    """The adapter was built for a different base weight (other values or another shape)."""


class DamagedAdapterError(InputError):
    """An adapter's weights are not those its ``adapter_config.json`` recorded when the edit was built: a tensor is
    damaged, missing, added or renamed."""


def store_name(kind: str, unit: str) -> str:
    """The attribute (and state-dict) name of the store ``kind`` of ``unit``: ``curvedit_Q`` for a linear layer,
    ``curvedit_out_gate_up_proj`` for an expert projection."""
    return f"curvedit_{kind}_{unit}" if unit else f"curvedit_{kind}"


def unit_stores(unit: str) -> tuple[str, ...]:
    """The stores of one unit (``""``: a linear layer's weight; else an experts module's parameter)."""
    return tuple(store_name(k, unit) for k in (EXPERTS_KINDS if unit else LINEAR_KINDS))


def entry_stores(name: str, info: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """``(module, stores)`` of one ``edited_modules`` entry: the module the layer wraps and its stores for it."""
    if info.get("experts"):
        module, _, param = name.rpartition(".")
        return module, unit_stores(param)
    return name, unit_stores("")


def adapter_file_keys(edited_modules: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Every tensor key an adapter file of these entries holds → ``(entry, store)``."""
    out = {}
    for name, info in edited_modules.items():
        module, stores = entry_stores(name, info)
        out.update({f"{FILE_PREFIX}{module}.{s}": (name, s) for s in stores})
    return out


def damaged_message(adapter_name: str, unit_name: str, problem: str = "", source: str | None = None) -> str:
    """The `DamagedAdapterError` message: which edit, what is wrong, and the fix."""
    where = f"{source}/adapter_model.safetensors" if source else "adapter_model.safetensors"
    problem = problem or ("its weights do not match the digest its adapter_config.json recorded when the edit was "
                          "built")
    which = f" of module '{unit_name}'" if unit_name else ""
    return (f"curvature edit '{adapter_name}'{which}: {problem}. {where} is damaged or was changed "
            "since the edit was built, and is not used. Download the adapter again (for a Hub repo: `hf download "
            "REPO --force-download`) or build the edit again (hf-curvedit edit).")


def canonical_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """The one digest per entry that adapters saved before per-tensor digests record: float tensors hashed as
    float32. Only read to check such adapters."""
    return digest_of((name, t.float() if t.is_floating_point() else t) for name, t in tensors)


def digest_record(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """What an ``edited_modules`` entry records of a unit's tensors: each one's digest in its stored dtype, and the
    dtype of its factors (what loading allocates)."""
    return {"tensors": {name: tensor_digest(t) for name, t in tensors}, "dtype": str(tensors[0][1].dtype)[6:]}


def digest_problem(info: Mapping[str, Any], tensors: Mapping[str, torch.Tensor | None]) -> str | None:
    """What is wrong with a unit's tensors (store → tensor, ``None`` for one that was not loaded) against what its
    entry recorded; ``None`` when they match or when the entry records no digest (see `warn_if_unchecked`)."""
    recorded = info.get("tensors")
    if recorded is None:
        want = info.get("digest")
        if want is None:
            return None
        missing = [s for s, t in tensors.items() if t is None]
        if missing:
            return f"the adapter has no tensor {missing[0]!r}"
        return (None if canonical_digest([(s, t) for s, t in tensors.items()]) == want  # type: ignore[misc]
                else "its tensors do not match the digest its adapter_config.json recorded when the edit was built")
    unknown = sorted(set(recorded) - set(tensors))
    if unknown:
        return f"its adapter_config.json records tensors {unknown} that this module does not have"
    for store, t in tensors.items():
        if store not in recorded:
            return f"its adapter_config.json records no digest of tensor {store!r}"
        if t is None:
            return f"the adapter has no tensor {store!r}"
        if tensor_digest(t) != recorded[store]:
            return (f"tensor {store!r} does not match the digest its adapter_config.json recorded when the edit was "
                    "built")
    return None


def warn_if_unchecked(adapter_name: str, config: Any) -> None:
    """One warning when a loaded edit's config records no digest at all (saved before adapters recorded them). An
    entry without a digest among entries with one, or in a config saved by a release that records them, is a changed
    config and is refused."""
    entries = getattr(config, "edited_modules", None) or {}
    bare = [n for n, info in entries.items() if info.get("tensors") is None and info.get("digest") is None]
    if not bare:
        return
    if len(bare) < len(entries) or getattr(config, "curvedit_version", None):
        raise DamagedAdapterError(damaged_message(
            adapter_name, bare[0], "its entry in adapter_config.json records no digest, although the adapter was "
            "saved with digests, so the config was changed", getattr(config, "_curvedit_source", None)))
    version = getattr(config, "peft_version", None)
    warnings.warn(f"curvature edit '{adapter_name}' was saved (with peft {version or 'of unknown version'}) by an "
                  "hf-curvedit release from before adapters recorded digests, so its tensors cannot be checked for "
                  "damage. Save it again (save_pretrained) to record them.", UserWarning, stacklevel=3)


class PinnedDtypeBufferDict(BufferDict):
    """A `BufferDict` whose tensors keep their dtype when the model is cast (``model.half()``, ``.to(bfloat16)``).

    PEFT's own dtype handling (``autocast_adapter_dtype``) upcasts adapter tensors when an adapter is created or
    loaded, but a later ``Module.half()`` reaches buffers only through ``_apply``. The edit's factors stay in the dtype
    they were built or saved in (float32, float64 for a float64 base) and its metadata float64 whatever the model is
    cast to; devices still move.

    A loader that assigns tensors (transformers' ``load_adapter``, ``load_state_dict(assign=True)``) is noted in
    ``assigned``, so that a tensor the file lacks is named as missing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__["assigned"] = set()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if torch.is_tensor(value) and name in self._buffers:
            self.__dict__["assigned"].add(name)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # A BufferDict holds buffers only (no parameters, no children). Where `fn` would change a dtype, only its
        # device is taken, from the original tensor: casting down and back up would lose the precision kept here.
        for key, t in self._buffers.items():
            if t is None:
                continue
            moved = fn(t)
            self._buffers[key] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        return self


class FingerprintStore(PinnedDtypeBufferDict):
    """The per-adapter fingerprints of one unit, which tell their layer when a loader assigns one.

    PEFT loads adapters with ``load_state_dict`` (the layer's ``_load_from_state_dict`` checks the base weight and the
    digest then), but transformers 5's ``load_adapter`` assigns each loaded tensor with ``setattr`` on the owning
    module. The fingerprint is always loaded, so its assignment is where the layer checks the loaded edit against its
    base weight; the digest is checked once every tensor is in, before the edit's first use.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        owner = self.__dict__.get("_owner")
        layer = owner() if owner is not None else None
        if layer is not None and torch.is_tensor(value) and name in self._buffers:
            layer._on_fingerprint_loaded(name, self.__dict__.get("_unit", ""))


def wrong_base_message(adapter_name: str, module_name: str, problem: str) -> str:
    where = f" at module '{module_name}'" if module_name else ""
    return (
        f"curvature edit '{adapter_name}' was built for a different base model{where}: {problem}. Load the adapter "
        "onto the base model it was made from (see base_model_name_or_path in its adapter_config.json)."
    )
