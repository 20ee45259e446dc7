"""Collecting per-token K-FAC factors A = E[a aᵀ] and G = E[g gᵀ], storing, resuming, reducing.

Approximation (METHOD.md §1): for a linear layer y = W a (+ b) the Fisher block of W is
approximated as G ⊗ A. Every valid token position is one sample ("expand" K-FAC): a position is
valid when it and the next position are real tokens, so it has a next-token target. The loss is the
*sum* of the per-token losses, so ∂loss/∂y at a position is that position's gradient g; sums are
divided by the token count at the end.

Image classifiers (``main_input_name == "pixel_values"``: ViT, DeiT, BEiT, DINOv2, Swin, ...) have
one loss per image, with the label sampled from the model's class distribution or read from the
data. Their K-FAC samples are the class-token position of each image (``token_positions="cls"``,
the paper's ViT setting) or every token position (``"all"``); g at a position is the gradient of
that image's loss w.r.t. the layer's output there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data import (DataSource, count_batches, image_batch_converter, iter_batches, load_text_dataset,
                    pack_into_blocks, select_image_columns)
from ..targets import is_linear_like, linear_shape, resolve_target_modules
from ..utils import atomic_path
from .config import FactorConfig
from .eigen import EIGEN_FILENAME, KFACEigen, ModuleEigen, symmetric_eigh

logger = logging.getLogger(__name__)

FACTORS_FILENAME = "factors.safetensors"
CHECKPOINT_DIR = "checkpoint"
FORMAT = "hf_curvedit.factors"
FORMAT_VERSION = "1"

# Covariances are symmetric, so only the upper triangle is computed: as a few row strips
# acc[i0:i1, i0:] += x[:, i0:i1]ᵀ x[:, i0:], which covers every entry on or above the diagonal
# with ~(1 + 1/n)/2 of the GEMM work and few, large GEMM calls. The lower triangle is mirrored
# at the end.
_MIN_STRIP = 128
_MAX_STRIPS = 4


def _strips(d: int) -> list[tuple[int, int]]:
    n = max(1, min(_MAX_STRIPS, d // _MIN_STRIP))
    edges = [round(i * d / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _accumulate_upper(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc[upper triangle] += (xᵀx)[upper triangle] for x of shape (N, d); acc may be float64."""
    for i0, i1 in _strips(x.shape[1]):
        if acc.dtype == x.dtype:
            acc[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:])
        else:
            acc[i0:i1, i0:] += (x[:, i0:i1].T @ x[:, i0:]).to(acc.dtype)


def _mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix whose upper triangle is that of ``acc``."""
    return torch.triu(acc) + torch.triu(acc, 1).T


def valid_position_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions that are real tokens and whose next position is a real token too."""
    am = attention_mask.bool()
    valid = torch.zeros_like(am)
    valid[:, :-1] = am[:, :-1] & am[:, 1:]
    return valid


def sample_labels(logits: torch.Tensor, generator: torch.Generator, chunk_size: int) -> torch.Tensor:
    """Draw one label per row of ``logits`` (N, V) from softmax(logits), ``chunk_size`` rows at a time.

    Chunking bounds the fp32 probability tensor to chunk_size × V instead of N × V.
    """
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    vocab = logits.shape[-1]
    for s in range(0, logits.shape[0], chunk_size):
        # Inverse-CDF sampling needs one uniform draw per row; torch.multinomial draws one
        # exponential per vocabulary entry, which dominated collection time on CPU.
        cdf = torch.softmax(logits[s:s + chunk_size].float(), dim=-1).cumsum_(dim=-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
        out[s:s + chunk_size] = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab - 1)
    return out


def _batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    # One generator per global batch: labels depend only on (seed, batch), not on how many
    # processes share the work or where a run was resumed.
    digest = hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


ModelTask = Literal["causal-lm", "image-classification"]


def model_task(model: nn.Module) -> ModelTask:
    """``"image-classification"`` for models that take ``pixel_values``, else ``"causal-lm"``."""
    return "image-classification" if getattr(model, "main_input_name", "input_ids") == "pixel_values" else "causal-lm"


def has_class_token(model: nn.Module) -> bool:
    """Whether the model prepends a learned class token (ViT, DeiT, BEiT, DINOv2 do; Swin does not)."""
    return any(n.split(".")[-1] == "cls_token" for n, _ in model.named_parameters())


def resolve_token_positions(model: nn.Module, config: FactorConfig) -> str:
    """The position rule for ``model``: ``"valid"`` (next-token positions) for a language model,
    ``"cls"`` or ``"all"`` for an image classifier. Raises a ``ValueError`` for a rule the model cannot use."""
    if model_task(model) == "causal-lm":
        if config.token_positions is not None:
            raise ValueError(f"token_positions={config.token_positions!r} is for image classifiers; a language model "
                             "uses every position that has a next-token target. Leave token_positions unset.")
        return "valid"
    cfg = getattr(model, "config", None)
    problem = getattr(cfg, "problem_type", None)
    if problem not in (None, "single_label_classification") or getattr(cfg, "num_labels", 2) < 2:
        raise ValueError(f"K-FAC factors for image models need a single-label classifier (softmax over >= 2 classes); "
                         f"this one has problem_type={problem!r}, num_labels={getattr(cfg, 'num_labels', None)}.")
    positions = config.token_positions or "cls"
    if positions == "cls" and not has_class_token(model):
        raise ValueError(f"{type(model).__name__} has no class token, so token_positions='cls' has nothing to take; "
                         "use token_positions='all'.")
    if positions == "cls" and getattr(cfg, "use_mean_pooling", False):
        # The head reads the mean of the patch tokens, so the last blocks get no gradient at the class token.
        raise ValueError(f"{type(model).__name__} classifies from the mean of its patch tokens (use_mean_pooling=True), "
                         "not from the class token; use token_positions='all'.")
    return positions


def _dist_state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState only detects a multi-process CPU run (torchrun, debug_launcher) when told it is
    # on CPU; an existing Accelerator/PartialState singleton is reused as is.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def model_fingerprint(model: nn.Module, module_names: Iterable[str]) -> dict[str, Any]:
    """What a factor file must agree with: model type and the (d_out, d_in) of each module."""
    mods = dict(model.named_modules())
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "module_shapes": {n: list(linear_shape(mods[n])) for n in module_names},
    }


@dataclass
class KFACFactors:
    """K-FAC factors of a set of linear layers.

    ``A[name]`` is E[a aᵀ] (d_in × d_in) and ``G[name]`` is E[g gᵀ] (d_out × d_out), averaged over
    ``num_tokens[name]`` samples (valid token positions; for an image classifier, class tokens or all token
    positions of the images). Modules that read the same input (gate and up
    projections) share one A tensor; ``a_alias`` maps such a module to the one that owns A.
    """

    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    num_tokens: dict[str, int]
    config: FactorConfig
    model_info: dict[str, Any]
    a_alias: dict[str, str] = field(default_factory=dict)
    factors_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    path: Optional[Path] = None

    @property
    def module_names(self) -> list[str]:
        """Names of the modules with factors, in model order."""
        return list(self.G)

    def __repr__(self) -> str:
        toks = max(self.num_tokens.values()) if self.num_tokens else 0
        return f"KFACFactors({len(self.G)} modules, {toks} tokens, label_mode={self.config.label_mode!r})"

    # ----------------------------------------------------------------------------- storage
    def save(self, output_dir: str | Path) -> Path:
        """Write ``factors.safetensors`` (atomically) with config, token counts and model info as metadata."""
        output_dir = Path(output_dir)
        tensors: dict[str, torch.Tensor] = {}
        for name in self.G:
            if name not in self.a_alias:
                tensors[f"{name}.A"] = self.A[name].contiguous().cpu()
            tensors[f"{name}.G"] = self.G[name].contiguous().cpu()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "factors_id": self.factors_id,
            "modules": json.dumps(self.module_names),
            "a_alias": json.dumps(self.a_alias),
            "num_tokens": json.dumps(self.num_tokens),
            "config": json.dumps(self.config.to_dict()),
            "model_info": json.dumps(self.model_info),
        }
        path = output_dir / FACTORS_FILENAME
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> "KFACFactors":
        """Read factors from a folder or a ``factors.safetensors`` file; check them against ``model`` if given."""
        path = Path(path)
        if path.is_dir():
            path = path / FACTORS_FILENAME
        if not path.exists():
            partial = path.parent / CHECKPOINT_DIR
            hint = (f" A partial run exists in {partial}: run fit_factors again with the same output_dir to resume it."
                    if partial.exists() else "")
            raise FileNotFoundError(f"no factors at {path}.{hint}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an hf-curvedit factor file (format={meta.get('format')!r})")
            names = json.loads(meta["modules"])
            alias = json.loads(meta["a_alias"])
            A: dict[str, torch.Tensor] = {}
            G: dict[str, torch.Tensor] = {}
            for n in names:
                G[n] = f.get_tensor(f"{n}.G")
                if n not in alias:
                    A[n] = f.get_tensor(f"{n}.A")
            for n, owner in alias.items():
                A[n] = A[owner]
        factors = cls(A=A, G=G, num_tokens=json.loads(meta["num_tokens"]),
                      config=FactorConfig.from_dict(json.loads(meta["config"])),
                      model_info=json.loads(meta["model_info"]), a_alias=alias,
                      factors_id=meta["factors_id"], path=path)
        for n in names:
            for kind, t in (("A", A[n]), ("G", G[n])):
                if not torch.isfinite(t).all():
                    raise ValueError(f"factor {kind} of {n} in {path} has non-finite entries; refit the factors.")
        if model is not None:
            factors.check_model(model)
        return factors

    def check_model(self, model: nn.Module) -> None:
        """Raise a ValueError that lists every difference if these factors do not belong to ``model``."""
        mods = dict(model.named_modules())
        problems: list[str] = []
        want_type = self.model_info.get("model_type")
        have_type = getattr(getattr(model, "config", None), "model_type", None)
        if want_type and have_type and want_type != have_type:
            problems.append(f"model_type: factors are for {want_type!r}, the model is {have_type!r}")
        shapes = self.model_info.get("module_shapes", {})
        missing = [n for n in self.module_names if n not in mods]
        if missing:
            problems.append(f"{len(missing)} module(s) not in the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for n in self.module_names:
            if n in mods:
                m = mods[n]
                if not is_linear_like(m):
                    problems.append(f"{n}: is a {type(m).__name__} in the model, not a linear layer")
                    continue
                have = list(linear_shape(m))
                want = shapes.get(n, [int(self.G[n].shape[0]), int(self.A[n].shape[0])])
                if have != list(want):
                    problems.append(f"{n}: factors are for (d_out, d_in)={tuple(want)}, the model has {tuple(have)}")
        if problems:
            src = self.path or "these factors"
            raise ValueError(
                f"{src} do not match this model ({self.model_info.get('name_or_path') or 'unknown source'}):\n  - "
                + "\n  - ".join(problems)
                + "\nFit factors for this model with fit_factors(model, ...), or load the model they were fitted on."
            )

    def eigendecompose(self, cache_dir: str | Path | None = None) -> KFACEigen:
        """See :func:`eigendecompose`."""
        return eigendecompose(self, cache_dir)


def load_factors(path: str | Path, model: nn.Module | None = None) -> KFACFactors:
    """Load factors written by :func:`fit_factors`; see :meth:`KFACFactors.load`."""
    return KFACFactors.load(path, model)


def eigendecompose(factors: KFACFactors, cache_dir: str | Path | None = None) -> KFACEigen:
    """Eigendecompose every factor in float64 (symmetrized, eigenvalues clamped at 0, descending).

    With ``cache_dir`` (default: the folder the factors were loaded from or saved to) the result
    is written to ``eigen.safetensors`` there and reused on the next call for the same factors.
    """
    if cache_dir is None and factors.path is not None:
        cache_dir = factors.path.parent
    cache = Path(cache_dir) / EIGEN_FILENAME if cache_dir is not None else None
    if cache is not None and cache.exists():
        try:
            cached = KFACEigen.load(cache)
        except Exception as e:  # a foreign or damaged cache is recomputed, never trusted
            logger.warning("ignoring eigen cache %s: %s", cache, e)
        else:
            if cached.metadata.get("factors_id") == factors.factors_id and set(cached) == set(factors.G):
                return cached
    done_A: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, ModuleEigen] = {}
    for name in tqdm(factors.module_names, desc="eigendecompose", unit="module", leave=False):
        owner = factors.a_alias.get(name, name)
        if owner not in done_A:
            done_A[owner] = symmetric_eigh(factors.A[owner])
        va, ua = done_A[owner]
        vg, ug = symmetric_eigh(factors.G[name])
        modules[name] = ModuleEigen(va, ua, vg, ug)
    meta = {
        "factors_id": factors.factors_id,
        "factor_config": factors.config.to_dict(),
        "num_tokens": factors.num_tokens,
        "model_info": factors.model_info,
        "factors_path": str(factors.path) if factors.path else None,
    }
    eig = KFACEigen(modules, meta)
    if cache is not None:
        eig.save(cache)
    return eig


# --------------------------------------------------------------------------------- collection
def _output_requires_grad(_module: nn.Module, _inputs: tuple, out: Any) -> None:
    # Some patch embeddings (Swin, BEiT) return (embeddings, sizes): the tensor is the first item.
    t = out[0] if isinstance(out, (tuple, list)) and out else out
    if torch.is_tensor(t) and t.is_floating_point() and not t.requires_grad:
        t.requires_grad_()


class _FactorCollector:
    """Hooks that accumulate upper-triangle covariance blocks of inputs and output-gradients."""

    def __init__(self, model: nn.Module, names: list[str], dtype: torch.dtype):
        mods = dict(model.named_modules())
        self.model = model
        self.names = names
        self.modules = {n: mods[n] for n in names}
        self.dtype = dtype
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {n: 0 for n in names}
        self.a_alias: dict[str, str] = {}
        self._alias_known = False
        self._idx: torch.Tensor | None = None
        self._positions = "valid"
        self._seen_inputs: dict[int, tuple[str, torch.Tensor]] = {}
        self._outputs: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def load_state(self, A: dict, G: dict, count: dict, alias: dict) -> None:
        self.A, self.G, self.count, self.a_alias = dict(A), dict(G), dict(count), dict(alias)
        self._alias_known = True

    def __enter__(self) -> "_FactorCollector":
        for n, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._make_hook(n)))
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if emb is not None:
            # With frozen weights nothing upstream requires grad; make the embedding output a leaf
            # that does, so the targets' outputs are differentiable without any weight gradient.
            self._handles.append(emb.register_forward_hook(_output_requires_grad))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_batch(self, valid: torch.Tensor | None, positions: str = "valid") -> None:
        """Start a batch. ``positions="valid"`` takes the rows where the (B, T) mask ``valid`` is set;
        ``"cls"`` takes position 0 of every sequence; ``"all"`` takes every position."""
        if positions == "valid":
            if valid is None:
                raise ValueError("positions='valid' needs a mask")
            self._idx = valid.reshape(-1).nonzero().squeeze(1)
        else:
            self._idx = torch.empty(0, dtype=torch.long)  # marks an open batch
        self._positions = positions
        self._seen_inputs.clear()
        self._outputs.clear()

    def _select(self, t: torch.Tensor, name: str) -> torch.Tensor:
        assert self._idx is not None
        if self._positions == "cls":
            if t.dim() not in (2, 3):
                raise ValueError(f"token_positions='cls' needs (batch, tokens, features) activations, but {name} sees "
                                 f"shape {tuple(t.shape)}; use token_positions='all'.")
            x = t[:, 0, :] if t.dim() == 3 else t  # (batch, features): one row per image already (e.g. the head)
        elif self._positions == "all":
            x = t.reshape(-1, t.shape[-1])
        else:
            flat = t.reshape(-1, t.shape[-1])
            idx = self._idx if self._idx.device == flat.device else self._idx.to(flat.device)
            x = flat.index_select(0, idx)
        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    def _num_rows(self, t: torch.Tensor) -> int:
        assert self._idx is not None
        if self._positions == "cls":
            return int(t.shape[0])
        if self._positions == "all":
            return t.numel() // t.shape[-1]
        return int(self._idx.numel())

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._idx is None:
                return
            x = inputs[0]
            if not self._alias_known:
                # Modules fed the very same tensor object (gate/up projections) share A. The tensor
                # is held until the batch ends so its id cannot be reused by another activation.
                seen = self._seen_inputs.get(id(x))
                if seen is not None and seen[1] is x:
                    self.a_alias[name] = seen[0]
                else:
                    self._seen_inputs[id(x)] = (name, x)
            if name not in self.a_alias:
                a = self._select(x.detach(), name)
                acc = self.A.get(name)
                if acc is None:
                    acc = self.A[name] = torch.zeros(a.shape[1], a.shape[1], dtype=self.dtype, device=a.device)
                _accumulate_upper(acc, a)
            if not output.requires_grad:
                raise RuntimeError(
                    f"the output of {name} does not require grad; the model's input embeddings could not "
                    "be hooked. Make sure model.get_input_embeddings() returns the embedding layer."
                )
            self.count[name] += self._num_rows(x)
            output.register_hook(self._make_grad_hook(name))
            self._outputs.append(output)

        return hook

    def _make_grad_hook(self, name: str) -> Callable:
        def grad_hook(grad: torch.Tensor) -> None:
            g = self._select(grad, name)
            acc = self.G.get(name)
            if acc is None:
                acc = self.G[name] = torch.zeros(g.shape[1], g.shape[1], dtype=self.dtype, device=g.device)
            _accumulate_upper(acc, g)

        return grad_hook

    def end_batch(self) -> None:
        self._alias_known = True
        self._idx = None
        self._outputs.clear()
        self._seen_inputs.clear()

    def finalized_sums(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full symmetric sums (lower blocks mirrored from the upper ones)."""
        A = {n: _mirror_upper(t) for n, t in self.A.items()}
        G = {n: _mirror_upper(t) for n, t in self.G.items()}
        return A, G


def _plan_partitions(model: nn.Module, names: list[str], cfg: FactorConfig) -> list[list[str]]:
    if cfg.max_factor_memory_gb is None:
        return [names]
    mods = dict(model.named_modules())
    elt = 8 if cfg.accumulate_dtype == "float64" else 4
    budget = cfg.max_factor_memory_gb * 1024**3
    parts: list[list[str]] = [[]]
    used = 0.0
    for n in names:
        d_out, d_in = linear_shape(mods[n])
        need = (d_in * d_in + d_out * d_out) * elt
        if need > budget:
            raise ValueError(
                f"max_factor_memory_gb={cfg.max_factor_memory_gb} is too small for {n}: its factors alone need "
                f"{need / 1024**3:.3f} GiB. Raise the budget to at least that."
            )
        if used + need > budget and parts[-1]:
            parts.append([])
            used = 0.0
        parts[-1].append(n)
        used += need
    return parts


def _checkpoint_file(output_dir: Path, part: int, rank: int, world: int) -> Path:
    return output_dir / CHECKPOINT_DIR / f"part{part:03d}-rank{rank:03d}-of-{world:03d}.safetensors"


def _save_checkpoint(path: Path, col: _FactorCollector, next_batch: int, done: bool, key: dict) -> None:
    tensors = {f"{n}.A": t.contiguous().cpu() for n, t in col.A.items()}
    tensors.update({f"{n}.G": t.contiguous().cpu() for n, t in col.G.items()})
    meta = {"format": FORMAT + ".checkpoint", "next_batch": str(next_batch), "done": json.dumps(done),
            "count": json.dumps(col.count), "a_alias": json.dumps(col.a_alias), "key": json.dumps(key, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_checkpoint(path: Path, key: dict, device_of: Callable[[str], torch.device]):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if json.loads(meta["key"]) != json.loads(json.dumps(key, sort_keys=True)):
            raise ValueError(
                f"the checkpoint in {path.parent} was written with different settings or for a different model. "
                "Use another output_dir, or pass resume=False to start over (this deletes the partial results)."
            )
        A, G = {}, {}
        for k in f.keys():
            n, kind = k.rsplit(".", 1)
            (A if kind == "A" else G)[n] = f.get_tensor(k).to(device_of(n))
    return A, G, json.loads(meta["count"]), json.loads(meta["a_alias"]), int(meta["next_batch"]), json.loads(meta["done"])


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _input_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], valid: torch.Tensor | None, cfg: FactorConfig,
                batch_index: int) -> torch.Tensor:
    if "pixel_values" in batch:
        logits = model(pixel_values=batch["pixel_values"]).logits
        if logits.dim() != 2:
            raise ValueError(f"expected (batch, classes) logits from an image classifier, got shape {tuple(logits.shape)}")
        if cfg.label_mode == "empirical":
            targets = batch["labels"].to(logits.device)
            if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[-1]):
                raise ValueError(f"labels must lie in [0, {logits.shape[-1]}) (the model's num_labels); batch {batch_index} "
                                 f"has labels in [{int(targets.min())}, {int(targets.max())}]")
        else:
            with torch.no_grad():
                gen = _batch_generator(cfg.seed, batch_index, logits.device)
                targets = sample_labels(logits.detach(), gen, cfg.sample_chunk_size)
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    assert valid is not None
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits
    flat_idx = valid.reshape(-1).nonzero().squeeze(1).to(logits.device)
    sel = logits.reshape(-1, logits.shape[-1]).index_select(0, flat_idx)
    if cfg.label_mode == "empirical":
        targets = batch["input_ids"].roll(-1, dims=1).reshape(-1).to(logits.device).index_select(0, flat_idx)
    else:
        with torch.no_grad():
            gen = _batch_generator(cfg.seed, batch_index, logits.device)
            targets = sample_labels(sel.detach(), gen, cfg.sample_chunk_size)
    return F.cross_entropy(sel.float(), targets, reduction="sum")


def collect_factor_sums(
    model: nn.Module,
    batches: Iterable[tuple[int, dict[str, torch.Tensor]]],
    module_names: list[str],
    config: FactorConfig,
    *,
    collector: _FactorCollector | None = None,
    on_batch_end: Callable[[int, _FactorCollector], None] | None = None,
    progress: tqdm | None = None,
) -> _FactorCollector:
    """Run forward/backward over ``batches`` and accumulate raw (un-normalized) factor sums.

    The lower-level engine behind :func:`fit_factors`; ``batches`` yields ``(global_index, batch)``
    with ``input_ids`` and ``attention_mask`` (language models) or ``pixel_values`` and, for
    empirical labels, ``labels`` (image classifiers). No weight gradient is computed or stored.
    """
    positions = resolve_token_positions(model, config)
    dtype = torch.float64 if config.accumulate_dtype == "float64" else torch.float32
    col = collector or _FactorCollector(model, module_names, dtype)
    device = _input_device(model)
    was_training = model.training
    model.eval()
    try:
        with col:
            for b, batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                if "pixel_values" in batch:
                    if positions == "valid":
                        raise ValueError("got pixel_values for a model that takes input_ids")
                    batch["pixel_values"] = batch["pixel_values"].to(_input_dtype(model))
                    valid = None
                    col.begin_batch(None, positions)
                else:
                    if positions != "valid":
                        raise ValueError(f"{type(model).__name__} takes pixel_values, but the batch has {sorted(batch)}")
                    valid = valid_position_mask(batch["attention_mask"])
                    col.begin_batch(valid)
                with torch.enable_grad():
                    loss = _batch_loss(model, batch, valid, config, b)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss ({loss.item()}) at batch {b}; check the model's dtype and inputs")
                    outputs = list(col._outputs)
                    # Gradients w.r.t. the targets' outputs only: the tensor hooks see every g,
                    # and autograd skips all weight gradients and everything below the first target.
                    torch.autograd.grad(loss, outputs, allow_unused=True)
                col.end_batch()
                if progress is not None:
                    progress.update(int(valid.sum()) if valid is not None else int(batch["pixel_values"].shape[0]))
                if on_batch_end is not None:
                    on_batch_end(b, col)
    finally:
        model.train(was_training)
    return col


def fit_factors(
    model: nn.Module,
    dataset: DataSource,
    config: FactorConfig | None = None,
    output_dir: str | Path | None = None,
    *,
    tokenizer: Any | None = None,
    image_processor: Any | None = None,
    resume: bool = True,
    progress: bool = True,
) -> KFACFactors:
    """Collect K-FAC factors for every target module of ``model`` in one pass over ``dataset``.

    Args:
        model: A causal LM (``AutoModelForCausalLM``-style: ``model(input_ids, attention_mask).logits``)
            or an image classifier (``AutoModelForImageClassification``: ``model(pixel_values).logits``),
            in any dtype, on any device or spread with ``device_map``.
        dataset: A ``datasets.Dataset``/``IterableDataset`` (a text or ``input_ids`` column for a language
            model; an image or ``pixel_values`` column, and a label column for empirical labels, for an
            image classifier), a local file or folder, or a dataset name.
        config: What to collect (targets, label mode, block size, token budget, token positions); see
            :class:`FactorConfig`.
        output_dir: Where ``factors.safetensors`` and resumable checkpoints go. Without it nothing is
            written and nothing can be resumed.
        tokenizer: Needed when the data is raw text.
        image_processor: Needed when the data holds images rather than ``pixel_values``
            (e.g. ``AutoImageProcessor.from_pretrained(...)``).
        resume: Continue from a checkpoint in ``output_dir`` if one exists (default). ``False`` deletes it.
        progress: Show a tqdm bar (tokens/s, or images/s for an image classifier) on the main process.

    Under ``accelerate launch``/``torchrun`` each process takes every ``world_size``-th batch, the
    factor sums are reduced once at the end, and only the main process writes the result.
    """
    cfg = config or FactorConfig()
    images = model_task(model) == "image-classification"
    resolve_token_positions(model, cfg)
    if images and cfg.max_tokens is not None:
        raise ValueError("max_tokens counts text tokens; for an image classifier limit the data with max_examples=")
    if not images and cfg.max_examples is not None:
        raise ValueError("max_examples counts images; for a language model limit the data with max_tokens=")
    state = _dist_state()
    rank, world = state.process_index, state.num_processes
    names = resolve_target_modules(model, cfg.target_modules, exclude_modules=cfg.exclude_modules)
    info = model_fingerprint(model, names)
    out = Path(output_dir) if output_dir is not None else None

    if out is not None and (out / FACTORS_FILENAME).exists() and resume:
        done = KFACFactors.load(out)
        if done.config.collection_key() == cfg.collection_key() and done.model_info.get("module_shapes") == info["module_shapes"]:
            logger.info("factors already complete in %s; loading them", out)
            return done
        raise FileExistsError(
            f"{out / FACTORS_FILENAME} exists and was fitted with other settings or for another model. "
            "Choose another output_dir, or pass resume=False to overwrite it."
        )
    if out is not None and not resume and state.is_main_process:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        (out / FACTORS_FILENAME).unlink(missing_ok=True)
    state.wait_for_everyone()

    data = load_text_dataset(dataset)
    to_tensors = None
    if images:
        with_labels = cfg.label_mode == "empirical"
        blocks = select_image_columns(data, image_column=cfg.image_column, label_column=cfg.label_column,
                                      with_labels=with_labels)
        to_tensors = image_batch_converter(image_processor, image_column=cfg.image_column, label_column=cfg.label_column,
                                           with_labels=with_labels, num_channels=getattr(model.config, "num_channels", 3))
        max_blocks = cfg.max_examples
    else:
        blocks = pack_into_blocks(data, tokenizer, cfg.seq_len, text_column=cfg.text_column, packing=cfg.packing)
        max_blocks = cfg.max_tokens // cfg.seq_len if cfg.max_tokens is not None else None
    n_batches = count_batches(blocks, cfg.batch_size, max_blocks)
    if n_batches == 0:
        raise ValueError("the image data is empty" if images else
                         f"the data yields no block of seq_len={cfg.seq_len} tokens; provide more text or lower seq_len")
    key = {"config": cfg.collection_key(), "model": info, "world_size": world}
    partitions = _plan_partitions(model, names, cfg)
    if len(partitions) > 1:
        logger.info("memory budget splits %d modules into %d partitions (one data pass each)", len(names), len(partitions))
    mods = dict(model.named_modules())

    def device_of(n: str) -> torch.device:
        m = mods[n]
        return (m.weight if hasattr(m, "weight") else next(m.parameters())).device

    dtype = torch.float64 if cfg.accumulate_dtype == "float64" else torch.float32
    A_all: dict[str, torch.Tensor] = {}
    G_all: dict[str, torch.Tensor] = {}
    count_all: dict[str, int] = {}
    alias_all: dict[str, str] = {}
    for p, part in enumerate(partitions):
        col = _FactorCollector(model, part, dtype)
        start = 0
        ckpt = _checkpoint_file(out, p, rank, world) if out is not None else None
        finished = False
        if ckpt is not None and ckpt.exists():
            A, G, count, alias, start, finished = _load_checkpoint(ckpt, key, device_of)
            col.load_state(A, G, count, alias)
            logger.info("resuming partition %d from batch %d", p, start)
        if not finished:
            total_units = None
            if n_batches is not None:
                mine = len([b for b in range(start, n_batches) if b % world == rank])
                total_units = mine * cfg.batch_size * (1 if images else cfg.seq_len - 1)
            bar = tqdm(total=total_units, unit="img" if images else "tok", unit_scale=True,
                       dynamic_ncols=True,
                       desc=f"K-FAC factors{f' [part {p + 1}/{len(partitions)}]' if len(partitions) > 1 else ''}",
                       disable=not (progress and state.is_main_process))
            since = [0]

            def on_batch_end(b: int, c: _FactorCollector) -> None:
                since[0] += 1
                if ckpt is not None and cfg.checkpoint_every and since[0] % cfg.checkpoint_every == 0:
                    _save_checkpoint(ckpt, c, b + 1, False, key)

            batches = iter_batches(blocks, cfg.batch_size, start_batch=start, max_blocks=max_blocks,
                                   rank=rank, world_size=world, to_tensors=to_tensors)
            with bar:
                collect_factor_sums(model, batches, part, cfg, collector=col, on_batch_end=on_batch_end, progress=bar)
            if ckpt is not None:
                _save_checkpoint(ckpt, col, n_batches if n_batches is not None else 1 << 62, True, key)
        A, G = col.finalized_sums()
        for n in part:
            if n not in G and world == 1:
                raise RuntimeError(f"{n} never ran in the forward pass; is it part of the model's forward?")
        A_all.update(A)
        G_all.update(G)
        count_all.update(col.count)
        alias_all.update(col.a_alias)

    A_all, G_all, count_all = _reduce(A_all, G_all, count_all, names, alias_all, mods, dtype, world)

    for n in names:
        c = count_all[n]
        if c == 0:
            raise ValueError(f"no valid token positions reached {n}; the data has no usable tokens")
        G_all[n] = G_all[n] / c
        if not bool(G_all[n].diagonal().any()):
            hint = (" For an image classifier whose head does not read the class token, use token_positions='all'."
                    if images else "")
            raise ValueError(f"no gradient reached {n} at the sampled positions, so its G factor is zero: the module "
                             f"does not take part in computing the logits there.{hint}")
        if n not in alias_all:
            A_all[n] = A_all[n] / c
        for kind, t in (("A", A_all.get(n)), ("G", G_all[n])):
            if t is not None and not torch.isfinite(t).all():
                raise FloatingPointError(f"factor {kind} of {n} has non-finite entries; try accumulate_dtype='float64'")
    for n, owner in alias_all.items():
        A_all[n] = A_all[owner]

    # Hooks fill G in backward order; store everything in model order.
    factors = KFACFactors(A={n: A_all[n] for n in names}, G={n: G_all[n] for n in names},
                          num_tokens={n: count_all[n] for n in names}, config=cfg, model_info=info, a_alias=alias_all)
    if out is not None:
        if state.is_main_process:
            factors.save(out)
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        else:
            factors.path = out / FACTORS_FILENAME
        state.wait_for_everyone()
    return factors


def _reduce(A: dict, G: dict, count: dict, names: list[str], alias: dict, mods: dict, dtype: torch.dtype,
            world: int) -> tuple[dict, dict, dict]:
    """Sum the per-process factor sums, once, on CPU; single-process runs only move to CPU."""
    A = {n: t.cpu() for n, t in A.items()}
    G = {n: t.cpu() for n, t in G.items()}
    if world == 1:
        return A, G, dict(count)
    from accelerate.utils import reduce

    # A process that saw no batch has no accumulators: contribute zeros of the right shape.
    for n in names:
        d_out, d_in = linear_shape(mods[n])
        if n not in alias:
            A.setdefault(n, torch.zeros(d_in, d_in, dtype=dtype))
        G.setdefault(n, torch.zeros(d_out, d_out, dtype=dtype))
    dev = _dist_state().device
    for n in names:
        if n not in alias:
            A[n] = reduce(A[n].to(dev), reduction="sum").cpu()
        G[n] = reduce(G[n].to(dev), reduction="sum").cpu()
    counts = reduce(torch.tensor([count.get(n, 0) for n in names], dtype=torch.float64, device=dev), reduction="sum")
    return A, G, {n: int(c) for n, c in zip(names, counts.tolist())}
