"""`CurvatureEditConfig`: the PEFT configuration of a curvature edit, and the `PeftType.CURVEDIT` enum member."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import PeftType
from peft.utils.other import get_pattern_key

from ..errors import InputError
from ..selection import SELECTIONS, Selection
from ..utils import fill_unset_fields, parse_dtype

PEFT_TYPE_NAME = "CURVEDIT"


def _extend_peft_type() -> PeftType:
    """Add ``CURVEDIT`` to `peft.utils.PeftType` (idempotent) and return the member.

    PEFT's `register_peft_method` only accepts names that already exist in the enum, and an `Enum` cannot be
    subclassed once it has members, so the member is added to the enum's own maps, the way `enum` builds members.
    Because `PeftType` is a `str` enum, the member compares and hashes equal to ``"CURVEDIT"``, which is what
    ``adapter_config.json`` stores.
    """
    existing = PeftType.__members__.get(PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    # EnumType.__setattr__ refuses to (re)bind member names; the member lives in the class dict like the others
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


CURVEDIT = _extend_peft_type()


@dataclass
class CurvatureEditConfig(PeftConfig):
    """
    Configuration of a curvature edit ([`CurvatureEditModel`]): which linear layers to edit, how much curvature mass to
    keep, and where the K-FAC factors came from.

    Each targeted weight ``W`` is replaced by its projection onto the high-curvature components of the K-FAC
    eigenbasis, ``W' = U_G (M ∘ U_Gᵀ W U_A) U_Aᵀ`` (docs/method.md), stored as an exact rank-``k`` factorization
    ``W' = B Qᵀ`` with orthonormal ``Q``. The edit is fixed (nothing is trained); the factors are only needed when
    the adapter is *built*. A saved adapter carries its factorization, so loading it needs no factors.

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            Modules to edit, in the grammar `FactorConfig.target_modules` uses too: a string is a regex matched with
            ``re.fullmatch`` against the module name; a list holds exact names, name suffixes or globs
            (``"model.layers.1*.mlp.*"``). ``None`` picks the architecture default of
            `hf_curvedit.DEFAULT_TARGET_MODULES`
            (the MLP projections, as in the paper).
        exclude_modules (`Optional[Union[list[str], str]]`):
            Modules not to edit, same syntax as `target_modules`.
        keep_mass (`float`):
            Global ρ in ``(0, 1]``: the fraction of curvature mass to keep (paper: 0.6 for OLMo-2 7B gate/up).
        keep_mass_pattern (`dict[str, float]`):
            Per-module ρ overriding `keep_mass`, keyed by a regex matched against the end of the module name, like
            LoRA's ``rank_pattern``, e.g. ``{"layers.24.mlp.up_proj": 0.7, "down_proj": 0.9}``. The first match wins.
        selection (`str`):
            ``"curvature_mass"`` (the paper's staircase selection on ``λ_i μ_j``) or ``"factor_truncation"`` (keep
            the top eigenvectors of G and A separately until each reaches ρ of its eigenvalue mass, see docs/method.md).
        rank_cap (`Optional[int]`):
            If set, ``W'`` is truncated by SVD to rank ≤ `rank_cap` (lossy); the relative error is recorded per module
            and shown by the report.
        compute_dtype (`Optional[str]`):
            dtype of the unmerged adapter's matmuls. ``None`` (default) computes in the base layer's dtype (bf16 for a
            bf16 model), from copies of the float32 factors cast once per device and dtype; ``"float32"`` computes in
            float32 whatever the model dtype (the exact path). Where the factorization is not smaller than the weight
            (``k·(d_in + d_out) ≥ d_in·d_out``) the adapter runs the dense ``W'`` instead; for experts this is decided
            expert by expert. Merging is unaffected.
        min_expert_tokens (`Optional[int]`):
            Mixture-of-experts models only: the fewest tokens an expert's factors must have seen for that expert to be
            edited; an expert below it keeps its weights, and the adapter and the card record per expert how many
            tokens it saw. ``None`` (default) asks for ``max(d_out, d_in)`` of the expert's matrix, the fewest samples
            that can give full-rank factors. An expert that no token reached is never edited.
        protect (`dict[str, float]`):
            Protected domains: name → ρ of that domain's own factors (fitted on text of the capability to keep, e.g.
            ``{"arithmetic": 0.9}``). A component of W is kept when the general selection (`keep_mass`) *or* a
            protected domain's selection keeps it; the edited weight is the orthogonal projection of W onto the sum of
            those kept subspaces (docs/method.md, "Protected domains"). Building needs each domain's factors:
            ``build_curvature_edit(model, {"general": eigen, "arithmetic": eigen_math}, config)``.
        protect_factor_sources (`dict[str, dict]`):
            Provenance of each protected domain's factors (path, dataset, token count), like `factor_source`. Filled
            when building; with `peft.get_peft_model`, set ``{name: {"path": ".../factors"}}`` (an eigen store: its
            folder, ``eigen.safetensors`` or its index).
        factors_path (`Optional[str]`):
            Path of an eigen store ([`KFACEigen`]: its folder, ``eigen.safetensors``, or
            ``eigen.safetensors.index.json`` when sharded) used when the adapter is built through
            `peft.get_peft_model`. Not needed when building with [`build_curvature_edit`] or when loading a saved
            adapter.
        factor_source (`dict[str, Any]`):
            Free-form provenance of the factors (path, dataset, token count, label mode, ...). Filled from the
            factors' metadata when building; kept in ``adapter_config.json``.
        edited_modules (`dict[str, dict]`):
            Filled when the adapter is built: per edited module the rank ``k`` of its stored factorization and the side
            of ``Q`` (``"input"`` or ``"output"``), the shape of the buffers that loading allocates before the saved
            tensors are read, their dtype, and the digest of each saved tensor, which every load checks. Do not set it
            by hand. (The module's ρ is `keep_mass_for`; every other statistic is in the adapter's weights, see
            `CurvatureEditModel.edit_report`.)
        curvedit_version (`Optional[str]`):
            The hf-curvedit release that built the edit (filled when it is built).
        base_gguf (`Optional[dict[str, str]]`):
            The GGUF file the base model was read from, ``{"file": name, "sha256": digest}`` (filled when the edit is
            built on a model read by `hf_curvedit.gguf.load_gguf_model` or transformers' GGUF loader). Loading the
            edit onto a base read from another GGUF file is refused; a base read from safetensors is checked by its
            weights, as every base is.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules to edit: regex string, or list of names/suffixes. None = architecture default."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules not to edit (regex string, or list of names/suffixes)."}
    )
    keep_mass: float = field(default=0.6, metadata={"help": "Fraction ρ of curvature mass to keep, in (0, 1]."})
    keep_mass_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per-module ρ, keyed by a regex on the module name (like rank_pattern)."},
    )
    selection: Selection = field(
        default="curvature_mass", metadata={"help": "'curvature_mass' (paper) or 'factor_truncation'."}
    )
    rank_cap: int | None = field(
        default=None, metadata={"help": "Truncate each edited weight by SVD to at most this rank (lossy)."}
    )
    compute_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the unmerged adapter's matmuls: None = the base layer's dtype, or e.g. 'float32'."},
    )
    min_expert_tokens: int | None = field(
        default=None,
        metadata={"help": "MoE: experts whose factors saw fewer tokens stay unedited; None = max(d_out, d_in)."},
    )
    protect: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Protected domains: name -> rho of that domain's factors; kept components are the union."},
    )
    protect_factor_sources: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Provenance (path, dataset, tokens) of each protected domain's factors."},
    )
    factors_path: str | None = field(
        default=None, metadata={"help": "Eigen store (folder, eigen.safetensors or its index) for get_peft_model."}
    )
    factor_source: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Provenance of the factors (dataset, tokens, label mode, path)."}
    )
    edited_modules: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Filled at build time: per module k, q_side, dtype (buffer shapes) and tensor digests."},
    )
    curvedit_version: str | None = field(
        default=None, metadata={"help": "The hf-curvedit release that built the edit (filled at build time)."}
    )
    base_gguf: dict[str, str] | None = field(
        default=None, metadata={"help": "The GGUF file (name, sha256) the base was read from (filled at build time)."}
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs: Any) -> CurvatureEditConfig:
        """PEFT's `from_pretrained`; the config also remembers where it was read from, for the messages of a damaged
        adapter (not saved)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        source = str(pretrained_model_name_or_path) + (f"/{subfolder}" if subfolder else "")
        object.__setattr__(config, "_curvedit_source", source)
        return config

    def __post_init__(self) -> None:
        fill_unset_fields(self)
        super().__post_init__()
        self.peft_type = CURVEDIT
        # nothing is trained: keep PEFT from marking anything trainable
        self.inference_mode = True
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        _check_rho(self.keep_mass, "keep_mass")
        for pattern, rho in self.keep_mass_pattern.items():
            _check_rho(rho, f"keep_mass_pattern[{pattern!r}]")
        if not isinstance(self.protect, dict):
            raise InputError(f"protect must be a dict of domain name -> rho, e.g. {{'arithmetic': 0.9}}; got "
                             f"{self.protect!r}")
        for name, rho in self.protect.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise InputError(f"protected domain names must be identifiers (letters, digits, _), got {name!r}")
            _check_rho(rho, f"protect[{name!r}]")
        unknown = set(self.protect_factor_sources) - set(self.protect)
        if unknown:
            raise InputError(f"protect_factor_sources names {sorted(unknown)}, which protect does not list")
        if self.selection not in SELECTIONS:
            raise InputError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.rank_cap is not None and (not isinstance(self.rank_cap, int) or self.rank_cap < 1):
            raise InputError(f"rank_cap must be a positive integer or None, got {self.rank_cap!r}")
        if self.compute_dtype is not None:
            parse_dtype(self.compute_dtype)  # a clear error for an unknown name
        if self.min_expert_tokens is not None and (isinstance(self.min_expert_tokens, bool)
                                                   or not isinstance(self.min_expert_tokens, int)
                                                   or self.min_expert_tokens < 0):
            raise InputError(f"min_expert_tokens must be a non-negative integer or None (max(d_out, d_in) of each "
                             f"expert), got {self.min_expert_tokens!r}")

    def keep_mass_for(self, module_name: str) -> float:
        """ρ of one module: the first `keep_mass_pattern` key matching the end of its name, else `keep_mass`.

        The same matching as LoRA's ``rank_pattern`` (``peft.utils.other.get_pattern_key``).
        """
        key = get_pattern_key(list(self.keep_mass_pattern), module_name)
        return float(self.keep_mass_pattern.get(key, self.keep_mass))


def _check_rho(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise InputError(f"{name} must be a number in (0, 1] (the fraction of curvature mass to keep), got {value!r}")
