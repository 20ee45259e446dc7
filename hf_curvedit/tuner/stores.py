"""What the curvature-edit layers keep their edits in, and the errors a wrong or damaged edit raises: buffer stores
whose dtype a model cast does not change, the fingerprint store that checks a loaded edit against its base, and the
digest of an edit's tensors."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict

from ..integrity import digest_of

__all__ = ["ContentDigest", "DamagedAdapterError", "FingerprintStore", "PinnedDtypeBufferDict", "WrongBaseModelError",
           "canonical_digest", "damaged_message", "wrong_base_message"]


class WrongBaseModelError(ValueError):
    """The adapter was built for a different base weight (other values or another shape)."""


class DamagedAdapterError(ValueError):
    """An adapter's weights do not match the digest its ``adapter_config.json`` recorded when the edit was built."""


def damaged_message(adapter_name: str, module_name: str) -> str:
    return (f"curvature edit '{adapter_name}' of module '{module_name}' does not match the digest its "
            "adapter_config.json recorded when the edit was built: the adapter's weights (adapter_model.safetensors) "
            "are damaged or were changed since. It is not used. Download the adapter again (for a Hub repo: "
            "`hf download REPO --force-download`) or build the edit again (hf-curvedit edit).")


def canonical_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """The digest an edit's ``edited_modules`` entry records: float tensors hashed as float32, so that an edit loaded
    into float64 buffers (a float64 base) or from float64 into float32 ones checks against the same value."""
    return digest_of((name, t.float() if t.is_floating_point() else t) for name, t in tensors)


class PinnedDtypeBufferDict(BufferDict):
    """A `BufferDict` whose tensors keep their dtype when the model is cast (``model.half()``, ``.to(bfloat16)``).

    PEFT's own dtype handling (``autocast_adapter_dtype``) upcasts adapter tensors when an adapter is created or
    loaded, but a later ``Module.half()`` reaches buffers only through ``_apply``. The edit's factors stay float32
    (float64 on a float64 base) and its metadata float64 whatever the model is cast to; devices still move.
    """

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
    """The per-adapter fingerprints, which tell their layer when a loader assigns one.

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
            layer._on_fingerprint_loaded(name, *self.__dict__.get("_owner_args", ()))


def wrong_base_message(adapter_name: str, module_name: str, problem: str) -> str:
    where = f" at module '{module_name}'" if module_name else ""
    return (
        f"curvature edit '{adapter_name}' was built for a different base model{where}: {problem}. Load the adapter "
        "onto the base model it was made from (see base_model_name_or_path in its adapter_config.json)."
    )


class ContentDigest:
    """What a layer's digest checks need: its tensors of one adapter, their digest, and the comparison with the digest
    the adapter's config recorded (``self._curvedit_digests``). Mixed into `CurvatureEditLayer`."""

    def content_tensors(self, adapter_name: str, stores: Any = None) -> list[tuple[str, torch.Tensor]]:
        """The tensors of `adapter_name` that its digest covers, by store name (from ``stores``, a mapping of store
        name → tensor such as a state dict being loaded; by default the layer's own buffers)."""
        get = (lambda name: getattr(self, name)[adapter_name]) if stores is None else stores.__getitem__
        return [(name, get(name)) for name in self.other_param_names]

    def content_digest(self, adapter_name: str) -> str:
        """The digest of the edit `adapter_name` as this layer holds it (what ``edited_modules`` records)."""
        return canonical_digest(self.content_tensors(adapter_name))

    def _check_digest(self, adapter_name: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
        want = self._curvedit_digests.get(adapter_name)
        if want is not None and canonical_digest(tensors) != want:
            raise DamagedAdapterError(damaged_message(adapter_name, self._curvedit_module_name))
