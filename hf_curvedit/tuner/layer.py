"""The low-rank projection adapter layer: ``y = B (Qᵀ x) + b`` replaces ``y = W x + b`` (METHOD.md §2.4-2.5)."""

from __future__ import annotations

import math
import re
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..curvature.eigen import ModuleEigen
from ..selection import select_cutoffs
from ..targets import linear_shape

__all__ = [
    "CurvatureEdit",
    "CurvatureEditLayer",
    "CurvatureEditLinear",
    "ModuleEditReport",
    "WrongBaseModelError",
    "compute_edit",
    "weight_fingerprint",
]

# Layout of the per-adapter float64 metadata buffer (persisted in adapter_model.safetensors).
META_FIELDS = (
    "keep_mass",
    "r",
    "s",
    "k",
    "rank",  # rank of the stored factorization (k, or the rank cap if smaller)
    "kept_components",
    "total_components",
    "kept_mass_fraction",
    "q_side_output",  # 0: Q spans input space (W' = B Qᵀ), 1: Q spans output space (W' = Q Bᵀ)
    "weight_norm",  # ‖W‖_F
    "edited_norm",  # ‖W'‖_F (after the rank cap)
    "residual_norm",  # ‖W - W'‖_F (after the rank cap)
    "rank_cap",  # 0 = none
    "rank_cap_error",  # ‖W'_capped - W'‖_F / ‖W'‖_F
    "selection",  # 0: curvature_mass, 1: factor_truncation
)
_M = {name: i for i, name in enumerate(META_FIELDS)}
_SELECTION_CODES = {"curvature_mass": 0, "factor_truncation": 1}

_N_PROBES = 6
# A different weight moves each normalized probe by ~1/sqrt(n); bf16 rounding of the same weight by ~0.002/sqrt(n).
_PROBE_TOL = 0.1
_RMS_RTOL = 1e-2


class WrongBaseModelError(ValueError):
    """The adapter was built for a different base weight (other values or another shape)."""


class _FingerprintStore(BufferDict):
    """The per-adapter fingerprints, which tell their layer when a loader assigns one.

    PEFT loads adapters with ``load_state_dict`` (the layer's ``_load_from_state_dict`` checks the base weight then),
    but transformers 5's ``load_adapter`` assigns each loaded tensor with ``setattr`` on the owning module. The
    fingerprint is always loaded, so its assignment is where the layer verifies the loaded edit against its base.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        owner = self.__dict__.get("_owner")
        layer = owner() if owner is not None else None
        if layer is not None and torch.is_tensor(value) and name in self._buffers:
            layer._verify_loaded_edit(name)


def _probe_vectors(n: int, offset: int, device: torch.device) -> torch.Tensor:
    # Deterministic quasi-random unit vectors (no RNG, so they are the same on every machine and torch version).
    i = torch.arange(1, n + 1, dtype=torch.float64, device=device)[:, None]
    alphas = torch.tensor([math.sqrt(p) % 1.0 for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)], dtype=torch.float64,
                          device=device)[offset: offset + _N_PROBES]
    v = torch.cos(2 * math.pi * torch.remainder(i * alphas[None, :], 1.0) + 0.5)
    return v / v.norm(dim=0, keepdim=True)


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A float64 fingerprint of a logical ``(d_out, d_in)`` weight: shape, RMS and 6 normalized bilinear probes.

    The probes ``uᵀ W v / ‖W‖_F`` are insensitive to the storage dtype (a bf16 copy of the same weight matches) but
    tell apart two different weights of the same shape and scale.
    """
    d_out, d_in = weight.shape
    w = weight.detach().float()
    u = _probe_vectors(d_out, 0, w.device)
    v = _probe_vectors(d_in, _N_PROBES, w.device)
    norm = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    probes = ((u.T.float() @ w) @ v.float()).diagonal().double()
    probes = probes / norm if norm > 0 else probes
    rms = norm / math.sqrt(max(d_out * d_in, 1))
    return torch.cat([torch.tensor([d_out, d_in, rms], dtype=torch.float64), probes.cpu()])


def _fingerprint_mismatch(expected: torch.Tensor, actual: torch.Tensor) -> Optional[str]:
    expected, actual = expected.double().cpu(), actual.double().cpu()
    if expected.shape != actual.shape:
        return "the fingerprint format differs"
    if not torch.isfinite(expected).all() or expected[0] == 0:
        return None  # an unfilled (all-zero) fingerprint: nothing to compare against
    shape_e, shape_a = tuple(int(x) for x in expected[:2]), tuple(int(x) for x in actual[:2])
    if shape_e != shape_a:
        return f"weight shape (d_out, d_in) is {shape_a}, the adapter was built for {shape_e}"
    rms_e, rms_a = float(expected[2]), float(actual[2])
    if abs(rms_e - rms_a) > _RMS_RTOL * max(abs(rms_e), 1e-30):
        return f"weight RMS is {rms_a:.6g}, the adapter was built for {rms_e:.6g}"
    tol = _PROBE_TOL / math.sqrt(shape_e[0] * shape_e[1])
    diff = (expected[3:] - actual[3:]).abs()
    n_bad = int((diff > tol).sum())
    if n_bad:
        return (f"{n_bad} of {diff.numel()} fixed random projections of the weight differ (max |Δ| {float(diff.max()):.3g} "
                f"> tolerance {tol:.3g}): same shape and scale, different values")
    return None


@dataclass
class CurvatureEdit:
    """The result of editing one weight: ``W' = B Qᵀ`` (``q_side="input"``) or ``W' = Q Bᵀ`` (``"output"``)."""

    Q: torch.Tensor  # orthonormal columns
    B: torch.Tensor
    q_side: str
    cutoffs: torch.Tensor  # int64 (d_out,)
    meta: torch.Tensor  # float64, META_FIELDS
    fingerprint: torch.Tensor  # float64

    def dense(self) -> torch.Tensor:
        """The edited weight ``W'`` as a dense logical ``(d_out, d_in)`` matrix."""
        return self.B @ self.Q.T if self.q_side == "input" else self.Q @ self.B.T


def compute_edit(
    weight: torch.Tensor,
    eigen: ModuleEigen,
    keep_mass: float,
    selection: str = "curvature_mass",
    rank_cap: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> CurvatureEdit:
    """Edit one logical ``(d_out, d_in)`` weight with its K-FAC eigenbasis (float64 math, result in `dtype`).

    ``C = U_Gᵀ W U_A`` restricted to the ``r × s`` kept block, masked by the staircase; with ``s ≤ r`` the factors are
    ``Q = U_A[:, :s]``, ``B = U_G[:, :r] (M∘C)``, otherwise ``Q = U_G[:, :r]``, ``B = U_A[:, :s] (M∘C)ᵀ``.
    """
    d_out, d_in = weight.shape
    if eigen.shape != (d_out, d_in):
        raise ValueError(
            f"the eigenbasis is for a ({eigen.shape[0]}, {eigen.shape[1]}) weight but the module's weight is "
            f"({d_out}, {d_in}) (d_out, d_in); the factors were collected on a different model"
        )
    device = weight.device
    W = weight.detach().to(torch.float64)
    st = select_cutoffs(eigen.eigvals_G, eigen.eigvals_A, keep_mass, selection)
    r, s = st.r, st.s
    UG = eigen.eigvecs_G[:, :r].to(device, torch.float64)
    UA = eigen.eigvecs_A[:, :s].to(device, torch.float64)
    cutoffs = st.cutoffs.to(device)
    D = (UG.T @ W) @ UA
    D = D * (torch.arange(s, device=device)[None, :] < cutoffs[:r, None])
    if s <= r:
        q_side, Q, B = "input", UA, UG @ D
    else:
        q_side, Q, B = "output", UG, UA @ D.T
    k = min(r, s)
    weight_norm = float(torch.linalg.vector_norm(W))
    kept_norm = float(torch.linalg.vector_norm(D))
    rank, cap_error, edited_norm = k, 0.0, kept_norm
    if rank_cap is not None and rank_cap < k:
        # SVD of the non-orthonormal factor only: W' = B Qᵀ = U S (Q V)ᵀ, and Q V stays orthonormal
        U, S, Vh = torch.linalg.svd(B, full_matrices=False)
        B = U[:, :rank_cap] * S[:rank_cap]
        Q = Q @ Vh[:rank_cap].T
        rank = rank_cap
        edited_norm = float(torch.linalg.vector_norm(S[:rank_cap]))
        dropped = float(torch.linalg.vector_norm(S[rank_cap:]))
        cap_error = dropped / kept_norm if kept_norm > 0 else 0.0
    # W - W' splits into the removed components (orthogonal to the kept subspace) and the rank-cap loss inside it
    residual_norm = math.sqrt(max(weight_norm**2 - edited_norm**2, 0.0))
    meta = torch.zeros(len(META_FIELDS), dtype=torch.float64)
    values = {
        "keep_mass": float(keep_mass), "r": r, "s": s, "k": k, "rank": rank, "kept_components": st.kept_components,
        "total_components": st.total_components, "kept_mass_fraction": st.kept_mass_fraction,
        "q_side_output": float(q_side == "output"), "weight_norm": weight_norm, "edited_norm": edited_norm,
        "residual_norm": residual_norm, "rank_cap": float(rank_cap or 0), "rank_cap_error": cap_error,
        "selection": _SELECTION_CODES[selection],
    }
    for name, value in values.items():
        meta[_M[name]] = value
    return CurvatureEdit(
        Q=Q.to(dtype).contiguous(), B=B.to(dtype).contiguous(), q_side=q_side, cutoffs=st.cutoffs.to(torch.int64),
        meta=meta, fingerprint=weight_fingerprint(weight),
    )


@dataclass
class ModuleEditReport:
    """What the edit did to one module (see `CurvatureEditModel.edit_report`)."""

    module: str
    adapter: str
    d_out: int
    d_in: int
    keep_mass: float
    selection: str
    r: int
    s: int
    k: int
    rank: int
    kept_components: int
    total_components: int
    kept_component_fraction: float
    kept_mass_fraction: float
    kept_norm_fraction: float  # ‖W'‖ / ‖W‖
    removed_norm_fraction: float  # ‖W - W'‖ / ‖W‖
    rank_cap: Optional[int]
    rank_cap_error: float  # ‖W'_capped - W'‖ / ‖W'‖ (0 without a cap)
    adapter_bytes: int
    weight_bytes: int

    @property
    def bytes_ratio(self) -> float:
        """Adapter bytes over the bytes of the weight it replaces."""
        return self.adapter_bytes / self.weight_bytes if self.weight_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_ratio"] = self.bytes_ratio
        return out


class CurvatureEditLayer(BaseTunerLayer):
    """Adapter state of one linear layer: per adapter, the factorization of ``W'`` and its metadata, as buffers.

    Everything is a persistent buffer (never a parameter: the edit is fixed) kept in float32 (float64 when the base
    is float64), whatever dtype the base model is cast to.
    """

    # No trainable adapter weights: PEFT toggles requires_grad on `adapter_layer_names`, which must not touch buffers.
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = (
        "curvedit_Q", "curvedit_B", "curvedit_cutoffs", "curvedit_meta", "curvedit_fingerprint",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.curvedit_Q = BufferDict({}, persistent=True)
        self.curvedit_B = BufferDict({}, persistent=True)
        self.curvedit_cutoffs = BufferDict({}, persistent=True)
        self.curvedit_meta = BufferDict({}, persistent=True)
        self.curvedit_fingerprint = _FingerprintStore({}, persistent=True)
        # a weak reference: a strong one would be registered as a child module (a cycle in the module tree)
        self.curvedit_fingerprint.__dict__["_owner"] = weakref.ref(self)
        # The original weight while an edit is merged: restoring it is bit-exact in every dtype. Non-persistent:
        # it is the base weight, saved with the base model.
        self.register_buffer("curvedit_original_weight", None, persistent=False)
        self._curvedit_q_side: dict[str, str] = {}
        # Adapters whose buffers hold a computed or loaded edit that matched this layer's base weight. A cache of that
        # check, so that the forward pass never reads a buffer back to the host (a device sync on GPU).
        self._curvedit_verified: set[str] = set()
        self._curvedit_module_name = ""  # for error messages; set by update_layer
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

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _base_weight_logical(self) -> torch.Tensor:
        """The unedited weight as ``(d_out, d_in)``, also while an edit is merged."""
        w = self.curvedit_original_weight if self.merged else self.get_base_layer().weight
        return w.T if self.is_conv1d else w

    def _buffer_dtype(self) -> torch.dtype:
        w = self.get_base_layer().weight
        return torch.float64 if w.dtype == torch.float64 else torch.float32

    def _get_available_adapters(self) -> set[str]:
        return set(self.curvedit_Q.keys())

    def update_layer(
        self, adapter_name: str, config: Any, module_name: str, eigen: Optional[ModuleEigen] = None
    ) -> None:
        """Create adapter `adapter_name`: from `eigen` if given, else empty buffers sized from ``config.edited_modules``
        (to be filled by loading a saved adapter)."""
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} is not usable: it must be non-empty and contain no '.'")
        self._curvedit_module_name = module_name
        keep_mass = _pattern_value(config.keep_mass_pattern, module_name, config.keep_mass)
        device = self.get_base_layer().weight.device
        if eigen is not None:
            edit = compute_edit(
                self._base_weight_logical(), eigen, keep_mass, config.selection, config.rank_cap, self._buffer_dtype()
            )
            config.edited_modules[module_name] = {
                "k": int(edit.Q.shape[1]), "q_side": edit.q_side, "keep_mass": float(keep_mass),
            }
        else:
            info = config.edited_modules.get(module_name)
            if info is None and config.edited_modules:
                raise WrongBaseModelError(_wrong_base_message(
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
            k, q_side = int(info["k"]), str(info["q_side"])
            dt = self._buffer_dtype()
            q_dim, b_dim = (self.in_features, self.out_features) if q_side == "input" else (self.out_features, self.in_features)
            edit = CurvatureEdit(
                Q=torch.zeros(q_dim, k, dtype=dt), B=torch.zeros(b_dim, k, dtype=dt), q_side=q_side,
                cutoffs=torch.zeros(self.out_features, dtype=torch.int64),
                meta=torch.zeros(len(META_FIELDS), dtype=torch.float64),
                fingerprint=torch.zeros(3 + _N_PROBES, dtype=torch.float64),
            )
        self.curvedit_Q[adapter_name] = edit.Q.to(device)
        self.curvedit_B[adapter_name] = edit.B.to(device)
        self.curvedit_cutoffs[adapter_name] = edit.cutoffs.to(device)
        self.curvedit_meta[adapter_name] = edit.meta.to(device)
        self.curvedit_fingerprint[adapter_name] = edit.fingerprint.to(device)
        self._curvedit_q_side[adapter_name] = edit.q_side
        if eigen is not None:
            self._curvedit_verified.add(adapter_name)
        else:
            self._curvedit_verified.discard(adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
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
        self._curvedit_verified.discard(adapter_name)

    def edited_weight(self, adapter_name: str) -> torch.Tensor:
        """``W'`` of `adapter_name` as a logical ``(d_out, d_in)`` matrix in the buffer dtype."""
        self._check_ready(adapter_name)
        Q, B = self.curvedit_Q[adapter_name], self.curvedit_B[adapter_name]
        return B @ Q.T if self._curvedit_q_side[adapter_name] == "input" else Q @ B.T

    def _check_ready(self, adapter_name: str) -> None:
        if adapter_name not in self._curvedit_verified:
            self._verify_loaded_edit(adapter_name)

    def _verify_loaded_edit(self, adapter_name: str) -> None:
        """Accept the edit in the buffers of `adapter_name` once it is filled and belongs to this base weight."""
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
        self.check_base(adapter_name, self._curvedit_module_name)
        self._curvedit_verified.add(adapter_name)

    def check_base(self, adapter_name: str, module_name: str = "") -> None:
        """Raise `WrongBaseModelError` if the base weight is not the one `adapter_name` was built for."""
        problem = _fingerprint_mismatch(self.curvedit_fingerprint[adapter_name],
                                        weight_fingerprint(self._base_weight_logical()))
        if problem:
            raise WrongBaseModelError(_wrong_base_message(adapter_name, module_name, problem))

    def report(self, adapter_name: str, module_name: str = "") -> ModuleEditReport:
        """Per-module numbers of `adapter_name` (see [`ModuleEditReport`])."""
        self._check_ready(adapter_name)
        m = self.curvedit_meta[adapter_name].double().cpu()
        Q, B = self.curvedit_Q[adapter_name], self.curvedit_B[adapter_name]
        weight = self.get_base_layer().weight
        w_norm = float(m[_M["weight_norm"]])
        adapter_bytes = sum(t.numel() * t.element_size() for t in (Q, B))
        return ModuleEditReport(
            module=module_name, adapter=adapter_name, d_out=self.out_features, d_in=self.in_features,
            keep_mass=float(m[_M["keep_mass"]]),
            selection={v: k for k, v in _SELECTION_CODES.items()}[int(m[_M["selection"]])],
            r=int(m[_M["r"]]), s=int(m[_M["s"]]), k=int(m[_M["k"]]), rank=int(m[_M["rank"]]),
            kept_components=int(m[_M["kept_components"]]), total_components=int(m[_M["total_components"]]),
            kept_component_fraction=float(m[_M["kept_components"]] / m[_M["total_components"]]),
            kept_mass_fraction=float(m[_M["kept_mass_fraction"]]),
            kept_norm_fraction=float(m[_M["edited_norm"]]) / w_norm if w_norm > 0 else 0.0,
            removed_norm_fraction=float(m[_M["residual_norm"]]) / w_norm if w_norm > 0 else 0.0,
            rank_cap=int(m[_M["rank_cap"]]) or None, rank_cap_error=float(m[_M["rank_cap_error"]]),
            adapter_bytes=adapter_bytes, weight_bytes=weight.numel() * weight.element_size(),
        )


def _wrong_base_message(adapter_name: str, module_name: str, problem: str) -> str:
    where = f" at module '{module_name}'" if module_name else ""
    return (
        f"curvature edit '{adapter_name}' was built for a different base model{where}: {problem}. Load the adapter "
        "onto the base model it was made from (see base_model_name_or_path in its adapter_config.json)."
    )


def _pattern_value(patterns: dict[str, float], module_name: str, default: float) -> float:
    # same matching as PEFT's rank_pattern (peft.utils.other.get_pattern_key): the first key that matches the end
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return float(value)
    return float(default)


class CurvatureEditLinear(nn.Module, CurvatureEditLayer):
    """Curvature edit of an `nn.Linear` or GPT-2 `Conv1D`: enabled, ``y = B (Qᵀ x) + b``; disabled, the base layer."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, module_name: str,
        eigen: Optional[ModuleEigen] = None, **kwargs: Any,
    ) -> None:
        super().__init__()
        CurvatureEditLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name, eigen)

    def _active_edit(self) -> Optional[str]:
        active = [a for a in self.active_adapters if a in self.curvedit_Q]
        if len(active) > 1:
            raise ValueError(
                f"curvature edits replace the weight, so only one can be active on a layer; got {active}. "
                "Use model.set_adapter(name) with a single adapter name."
            )
        return active[0] if active else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        name = self._active_edit()
        if self.merged:
            if name in self.merged_adapters:
                return self.base_layer(x, *args, **kwargs)
            # another edit became active since the merge (e.g. transformers' set_adapter): never run a stale weight
            self.unmerge()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        self._check_ready(name)
        Q, B = self.curvedit_Q[name], self.curvedit_B[name]
        h = x.to(Q.dtype)
        if self._curvedit_q_side[name] == "input":
            y = (h @ Q) @ B.T
        else:
            y = (h @ B) @ Q.T
        bias = self.get_base_layer().bias
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Replace the base weight by ``W'`` of the (single) active edit; the original is kept for `unmerge`."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.curvedit_Q]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged:
            raise ValueError(
                f"curvature edits replace the weight, so only one can be merged at a time (asked for {adapter_names}, "
                f"already merged {self.merged_adapters}); unmerge first"
            )
        name = adapter_names[0]
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
        """``W' - W`` in the base layer's storage layout (full rank: the edit is a replacement, not a low-rank delta)."""
        base = self.get_base_layer()
        delta = self.edited_weight(adapter_name).to(torch.float32) - self._base_weight_logical().to(torch.float32)
        return (delta.T if self.is_conv1d else delta).to(base.weight.dtype)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # `model.to(torch.bfloat16)` / `.half()` would cast the adapter buffers too; keep their dtypes (devices move).
        dtypes = {(n, a): getattr(self, n)[a].dtype for n in self.other_param_names for a in getattr(self, n)}
        out = super()._apply(fn, recurse)
        for (n, a), dt in dtypes.items():
            store = getattr(self, n)
            if a in store and store[a].dtype != dt:
                store[a] = store[a].to(dt)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        # Runs before the children (the BufferDicts) load, so a wrong base is reported here with a clear message
        # instead of a size-mismatch error, and buffers whose rank differs from the config are resized first.
        module_name = prefix.rstrip(".").removeprefix("base_model.model.")
        for name in list(self.curvedit_Q.keys()):
            fp_key = f"{prefix}curvedit_fingerprint.{name}"
            if fp_key not in state_dict:
                continue
            problem = _fingerprint_mismatch(state_dict[fp_key], weight_fingerprint(self._base_weight_logical()))
            if problem:
                raise WrongBaseModelError(_wrong_base_message(name, module_name, problem))
            for store_name in self.other_param_names:
                key = f"{prefix}{store_name}.{name}"
                store = getattr(self, store_name)
                if key in state_dict and state_dict[key].shape != store[name].shape:
                    store[name] = torch.empty(state_dict[key].shape, dtype=store[name].dtype, device=store[name].device)
            meta_key = f"{prefix}curvedit_meta.{name}"
            if meta_key in state_dict:
                side = float(state_dict[meta_key].reshape(-1)[_M["q_side_output"]])
                self._curvedit_q_side[name] = "output" if side > 0.5 else "input"
            self._curvedit_verified.add(name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __repr__(self) -> str:
        return "curvedit." + super().__repr__()
