"""What an edit did to one module, decoded from its stored statistics (`META_FIELDS`): `ModuleEditReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..selection import SELECTIONS
from .experts import expert_is_edited
from .weight import META_INDEX

__all__ = ["ModuleEditReport"]


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
    rank_cap: int | None
    rank_cap_error: float  # ‖W'_capped - W'‖ / ‖W'‖ (0 without a cap)
    adapter_bytes: int
    weight_bytes: int
    # expert projections only: how many experts, how many the edit changed (and which not), and the tokens each
    # expert's factors saw
    num_experts: int | None = None
    edited_experts: int | None = None
    unedited_experts: list[int] | None = None
    expert_tokens: list[int] | None = None

    @property
    def bytes_ratio(self) -> float:
        """Adapter bytes over the bytes of the weight it replaces."""
        return self.adapter_bytes / self.weight_bytes if self.weight_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_ratio"] = self.bytes_ratio
        return out


    @classmethod
    def from_meta(cls, meta: torch.Tensor, *, module: str, adapter: str, d_out: int, d_in: int, adapter_bytes: int,
                  weight_bytes: int) -> ModuleEditReport:
        """Decode a `META_FIELDS` vector (the `CurvatureEdit.meta` of a computed or loaded edit)."""
        m = meta.detach().double().cpu()

        def get(name: str) -> float:
            return float(m[META_INDEX[name]])

        w_norm = get("weight_norm")
        return cls(
            module=module, adapter=adapter, d_out=d_out, d_in=d_in, keep_mass=get("keep_mass"),
            selection=SELECTIONS[int(get("selection"))], r=int(get("r")), s=int(get("s")), k=int(get("k")),
            rank=int(get("rank")), kept_components=int(get("kept_components")),
            total_components=int(get("total_components")),
            kept_component_fraction=get("kept_components") / get("total_components"),
            kept_mass_fraction=get("kept_mass_fraction"),
            kept_norm_fraction=get("edited_norm") / w_norm if w_norm > 0 else 0.0,
            removed_norm_fraction=get("residual_norm") / w_norm if w_norm > 0 else 0.0,
            rank_cap=int(get("rank_cap")) or None, rank_cap_error=get("rank_cap_error"),
            adapter_bytes=adapter_bytes, weight_bytes=weight_bytes,
        )

    @classmethod
    def from_expert_meta(cls, meta: torch.Tensor, tokens: torch.Tensor, *, module: str, adapter: str, d_out: int,
                         d_in: int, adapter_bytes: int, weight_bytes: int) -> ModuleEditReport:
        """One report for a whole expert projection from its stacked `META_FIELDS` rows: components and norms summed
        over every expert (an unedited expert keeps all of its own), ρ, r, s, k and the rank cap's error the largest
        among edited experts, the kept mass fraction their mean."""
        m = meta.detach().double().cpu()
        edited = expert_is_edited(m)
        col = lambda name: m[:, META_INDEX[name]]  # noqa: E731
        mx = lambda name: float(col(name)[edited].max()) if bool(edited.any()) else 0.0  # noqa: E731
        w_norm = float(col("weight_norm").square().sum().sqrt())
        kept = float(col("kept_components").sum())
        total = float(col("total_components").sum())
        return cls(
            module=module, adapter=adapter, d_out=d_out, d_in=d_in, keep_mass=mx("keep_mass"),
            selection=SELECTIONS[int(mx("selection"))],
            r=int(mx("r")), s=int(mx("s")), k=int(mx("k")), rank=int(mx("rank")),
            kept_components=int(kept), total_components=int(total),
            kept_component_fraction=kept / total if total else 0.0,
            kept_mass_fraction=float(col("kept_mass_fraction")[edited].mean()) if bool(edited.any()) else 1.0,
            kept_norm_fraction=float(col("edited_norm").square().sum().sqrt()) / w_norm if w_norm > 0 else 0.0,
            removed_norm_fraction=float(col("residual_norm").square().sum().sqrt()) / w_norm if w_norm > 0 else 0.0,
            rank_cap=int(mx("rank_cap")) or None, rank_cap_error=mx("rank_cap_error"),
            adapter_bytes=adapter_bytes, weight_bytes=weight_bytes, num_experts=int(m.shape[0]),
            edited_experts=int(edited.sum()), unedited_experts=(~edited).nonzero().reshape(-1).tolist(),
            expert_tokens=[int(t) for t in tokens.reshape(-1).tolist()],
        )
