"""`fit_eigen_correction`: the EK-FAC pass, a second resumable, multi-process pass over the data that measures the
curvature of every component of a weight in its K-FAC eigenbasis (see `correction.py` for what is measured).

For each sample (a sequence, or an image) the layer's weight gradient ``D = Σ_t g_t a_tᵀ`` over its sample positions
is rotated into the eigenbasis, ``U_Gᵀ D U_A = (G_rot)ᵀ A_rot`` with ``A_rot = a U_A`` and ``G_rot = g U_G`` (the
tokens are rotated first: cheaper than rotating ``D`` while a sample has fewer positions than the layer has
features), and its square is added to ``Λ``'s sum. No weight gradient is formed by autograd; the hooks see each
layer's input and output gradient, as the factor pass does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import DataSource, count_batches, iter_batches, load_text_dataset
from ..errors import Fix, InputError
from ..integrity import DamagedFileError, open_safetensors, output_lock, read_safetensors
from ..targets import weight_targets
from ..utils import all_finite, save_safetensors
from .collector import _require_grad, collect_factor_sums
from .config import FactorConfig, accumulator_dtype
from .correction import EKFAC_FILENAME, EigenCorrection
from .eigen import EIGEN_FILENAME, KFACEigen, ModuleEigen
from .fit import dist_state, one_processor, pass_bar
from .roots import GradientRoots
from .storage import FACTORS_FILENAME, REFIT, RESTART, KFACFactors, load_factors
from .tasks import FactorTask, SamplePositions, default_task

__all__ = ["LambdaCollector", "fit_eigen_correction"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "ekfac_checkpoint"
# One chunk of per-sample rotated gradients holds at most this many entries (bounds the pass's extra memory).
_CHUNK_ENTRIES = 1 << 24


class LambdaCollector:
    """Forward and gradient hooks that accumulate ``Σ_samples (U_Gᵀ D U_A)²`` for each module.

    The same protocol as `FactorCollector` (a context manager; `begin_batch` before a batch's forward pass,
    `end_batch` after its backward pass), so `collect_factor_sums` drives it.
    """

    def __init__(self, model: nn.Module, eigen: dict[str, ModuleEigen], dtype: torch.dtype):
        targets = weight_targets(model)
        experts = [n for n in eigen if n in targets and targets[n].is_experts]
        if experts:
            raise InputError(f"EK-FAC correction of expert projections is not supported ({experts[:2]}); leave them "
                             "out of the factors given to fit_eigen_correction, and edit them with "
                             "selection='curvature_mass'")
        missing = [n for n in eigen if n not in targets]
        if missing:
            raise InputError(f"{missing[:3]} are not linear layers of this model; the factors belong to another model")
        wrong = [f"{n}: bases for {eigen[n].shape}, the model has {targets[n].shape}" for n in eigen
                 if tuple(targets[n].shape) != eigen[n].shape]
        if wrong:
            raise InputError(f"the factors do not match this model ({'; '.join(wrong[:3])}); fit factors for this "
                             "model, or load the model they were fitted on")
        self.model = model
        self.modules = {n: targets[n].module for n in eigen}
        self.dtype = dtype
        # The bases in the accumulation dtype on their module's device, each converted once: gate and up share one
        # U_A (the same tensor, or equal tensors read from a cache), so their shared input is rotated once.
        converted: list[tuple[torch.Tensor, torch.Tensor]] = []

        def conv(t: torch.Tensor, device: torch.device) -> torch.Tensor:
            for src, dst in converted[-4:]:
                if src is t or (src.shape == t.shape and dst.device == device and torch.equal(src, t)):
                    return dst
            converted.append((t, t.to(device, dtype)))
            return converted[-1][1]

        devices = {n: targets[n].parameter().device for n in eigen}
        self.U_A = {n: conv(e.eigvecs_A, devices[n]) for n, e in eigen.items()}
        self.U_G = {n: conv(e.eigvecs_G, devices[n]) for n, e in eigen.items()}
        self.sums: dict[str, torch.Tensor] = {}
        self.num_samples = 0
        self._roots = GradientRoots()
        self._positions: SamplePositions | None = None
        self._batch_rows = 0
        self._rotated: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LambdaCollector:
        for n, m in self.modules.items():
            self._handles.append(self._roots.register(m))
            self._handles.append(m.register_forward_hook(self._make_hook(n)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_batch(self, positions: SamplePositions) -> None:
        """Start a batch whose sample positions are ``positions``: a (B, T) bool mask, ``"cls"`` or ``"all"``."""
        if not torch.is_tensor(positions) and positions not in ("cls", "all"):
            raise InputError(f"sample positions must be a (batch, tokens) mask, 'cls' or 'all'; got {positions!r}")
        self._positions = positions
        self._rotated.clear()
        self._roots.reset()

    @property
    def roots(self) -> list[torch.Tensor]:
        """This batch's leaves of the backward pass (see `hf_curvedit.curvature.roots`)."""
        return self._roots.tensors

    def _per_sample(self, t: torch.Tensor, masked: bool) -> torch.Tensor:
        """``t`` as (samples, positions, features); with ``masked``, positions that are no samples are zeroed (one
        side of each product is enough)."""
        if t.dim() == 2:  # (batch, features): one position per sample already (e.g. a classifier's head)
            return t[:, None, :]
        t = t.reshape(t.shape[0], -1, t.shape[-1])
        if self._positions == "cls":
            return t[:, :1, :]
        if masked and torch.is_tensor(self._positions):
            mask = self._positions.to(t.device).reshape(t.shape[0], -1)
            return t * mask[..., None].to(t.dtype)
        return t

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._positions is None or not torch.is_grad_enabled():
                return
            x = inputs[0]
            U_A = self.U_A[name]
            key = (id(x), id(U_A))
            if key not in self._rotated:  # modules that read the same input with the same basis rotate it once
                a = self._per_sample(x.detach(), masked=True)
                self._rotated[key] = (x, a.to(self.dtype) @ U_A)
            a_rot = self._rotated[key][1]
            self._batch_rows = a_rot.shape[0]
            _require_grad(output, name)
            output.register_hook(self._make_grad_hook(name, a_rot))

        return hook

    def _make_grad_hook(self, name: str, a_rot: torch.Tensor) -> Callable:
        def grad_hook(grad: torch.Tensor) -> None:
            g_rot = self._per_sample(grad, masked=False).to(self.dtype) @ self.U_G[name]
            d_out, d_in = g_rot.shape[-1], a_rot.shape[-1]
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros(d_out, d_in, dtype=self.dtype, device=g_rot.device)
            elif acc.device != g_rot.device:  # resumed from a checkpoint, read to the CPU
                acc = self.sums[name] = acc.to(g_rot.device)
            step = max(1, _CHUNK_ENTRIES // (d_out * d_in))
            for s in range(0, g_rot.shape[0], step):
                # (samples, d_out, d_in): each sample's weight gradient in the eigenbasis
                rotated = torch.bmm(g_rot[s:s + step].mT, a_rot[s:s + step])
                acc += rotated.square_().sum(0)

        return grad_hook

    def end_batch(self) -> None:
        if torch.is_tensor(self._positions):
            self.num_samples += int(self._positions.reshape(self._positions.shape[0], -1).any(1).sum())
        elif self._positions is not None:
            self.num_samples += self._batch_rows
        self._positions = None
        self._batch_rows = 0
        self._rotated.clear()
        self._roots.reset()


def fit_eigen_correction(
    model: nn.Module,
    dataset: DataSource,
    factors: KFACFactors | str | Path,
    config: FactorConfig | None = None,
    output_dir: str | Path | None = None,
    *,
    processor: Any = None,
    tokenizer: Any = None,
    image_processor: Any = None,
    task: FactorTask | None = None,
    resume: bool = True,
    progress: bool = True,
) -> EigenCorrection:
    """Measure the EK-FAC corrected eigenvalues ``Λ`` of every module of ``factors`` in one pass over ``dataset``.

    Args:
        model: The model the factors were fitted on (same weights).
        dataset: The data, as for `fit_factors` (usually the same data).
        factors: Fitted K-FAC factors, or the folder `fit_factors` wrote them to; their eigenbases (cached beside
            them) are the basis of ``Λ``. Given a folder, only the bases are held in memory during the pass.
        config: Data settings (block size, batch size, token budget, labels, seed); defaults to the factors' own, so
            that the pass sees the same blocks and, for sampled labels, draws the same labels.
        output_dir: Where ``ekfac.safetensors`` and resumable checkpoints go; defaults to the factors' folder, where
            ``eigendecompose`` and `EigenFile` find it and attach it to the bases.
        processor: The tokenizer or image processor, when the data is raw text or images.
        tokenizer, image_processor: The same as ``processor``, by their specific names.
        task: How batches become losses (see `FactorTask`); by default picked from the model.
        resume: Continue from a checkpoint in ``output_dir`` if one exists (default). ``False`` starts over.
        progress: Show a tqdm bar on the main process.

    Under ``accelerate launch``/``torchrun`` each process takes every ``world_size``-th batch and the sums are
    reduced once at the end. Expert projections are not supported.
    """
    processor = one_processor(processor, tokenizer, image_processor)
    state = dist_state()
    if isinstance(factors, KFACFactors):
        factors.check_model(model)
        home = factors.path.parent if factors.path else None
        out = Path(output_dir) if output_dir is not None else home
        fitted = factors
        bases = lambda: fitted.eigendecompose(out) if out is not None else fitted.eigendecompose()  # noqa: E731
    else:
        out = Path(output_dir) if output_dir is not None else Path(factors)
        folder = Path(factors)
        bases = lambda: _bases_in(folder)  # noqa: E731
    # one writer per folder from the first write on: the eigen cache is written into it too
    lock = (output_lock(out, "fit_eigen_correction") if out is not None and state.is_main_process
            else contextlib.nullcontext())
    with lock:
        # the main process decomposes (and caches) first; the others then read its cache
        eigen = bases() if state.is_main_process else None
        state.wait_for_everyone()
        eigen = eigen if eigen is not None else bases()
        if isinstance(factors, KFACFactors):
            factors_id, fitted_with = factors.factors_id, factors.config
        else:
            factors_id = eigen.metadata["factors_id"]
            fitted_with = FactorConfig.from_dict(eigen.metadata["factor_config"])
        cfg = config or fitted_with
        return _fit_eigen_correction(model, dataset, eigen, factors_id, cfg, out, processor, task, resume, progress)


def _bases_in(folder: Path) -> Any:
    """The eigenbases of the factors in ``folder``: its eigen cache when it belongs to them, else decomposed now
    (the factor tensors are not kept)."""
    if not (folder / FACTORS_FILENAME).exists():
        fix = Fix(python=f"fit_factors(model, data, config, '{folder}')", cli=f"hf-curvedit fit --output-dir {folder}")
        raise FileNotFoundError(f"{folder} holds no {FACTORS_FILENAME}; fit the factors first ({fix})")
    with open_safetensors(folder / FACTORS_FILENAME, "an hf-curvedit factor file", REFIT) as f:
        factors_id = (f.metadata() or {}).get("factors_id")
    if (folder / EIGEN_FILENAME).exists():
        try:
            cached = KFACEigen.load(folder / EIGEN_FILENAME)
        except DamagedFileError as err:
            logger.warning("%s; decomposing the factors again", err)
        else:
            if cached.metadata.get("factors_id") == factors_id:
                return cached
    return load_factors(folder).eigendecompose(folder)


def _fit_eigen_correction(model: nn.Module, dataset: DataSource, eigen: Any, factors_id: str, cfg: FactorConfig,
                          out: Path | None, processor: Any, task: FactorTask | None, resume: bool,
                          progress: bool) -> EigenCorrection:
    task = task or default_task(model)
    task.validate(model, cfg)
    state = dist_state()
    rank, world = state.process_index, state.num_processes
    names = list(eigen)
    key = {"factors_id": factors_id, "config": cfg.collection_key(), "world_size": world}
    if out is not None and resume and (out / EKFAC_FILENAME).exists():
        try:
            done = EigenCorrection.load(out)
        except DamagedFileError as err:
            logger.warning("%s; measuring it again", err)
        else:
            same = (done.factors_id == factors_id and set(done) == set(names)
                    and FactorConfig.from_dict(done.config).collection_key() == cfg.collection_key())
            if same:
                logger.info("corrected eigenvalues already complete in %s; loading them", out)
                return done
            raise FileExistsError(f"{out / EKFAC_FILENAME} exists and was measured for other factors or with other "
                                  f"settings. Choose another output folder, or {RESTART} to overwrite it.")
    ckpt = out / CHECKPOINT_DIR / f"rank{rank:03d}-of-{world:03d}.safetensors" if out is not None else None
    if ckpt is not None and not resume and state.is_main_process:
        shutil.rmtree(ckpt.parent, ignore_errors=True)
        (out / EKFAC_FILENAME).unlink(missing_ok=True)  # type: ignore[operator]
    state.wait_for_everyone()

    col = LambdaCollector(model, {n: eigen[n] for n in names}, accumulator_dtype(cfg))
    start = 0
    if ckpt is not None and ckpt.exists():
        try:
            start = _load_checkpoint(ckpt, key, col)
        except DamagedFileError as err:
            logger.warning("%s; this part starts over", err)
            ckpt.unlink()
        else:
            logger.info("resuming the EK-FAC pass from batch %d", start)
    data = task.prepare_data(model, load_text_dataset(dataset), cfg, processor)
    n_batches = count_batches(data.rows, cfg.batch_size, data.max_rows)
    bar = pass_bar("EK-FAC eigenvalues", task, data, cfg, n_batches, start, progress)
    since = [0]

    def on_batch_end(b: int, c: Any) -> None:
        since[0] += 1
        if ckpt is not None and cfg.checkpoint_every and since[0] % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, col, b + 1, key)

    batches = iter_batches(data.rows, cfg.batch_size, start_batch=start, max_blocks=data.max_rows, rank=rank,
                           world_size=world, to_tensors=data.to_tensors)
    with bar:
        collect_factor_sums(model, batches, names, cfg, task=task, collector=col,  # type: ignore[arg-type]
                            on_batch_end=on_batch_end, progress=bar)
    sums, count = _reduce(col, names, eigen, world)
    if count == 0:
        raise InputError("the EK-FAC pass saw no sample with a usable position; the data has no usable tokens")
    values = {}
    for n in names:
        values[n] = sums[n] / count
        if not all_finite(values[n]):
            raise FloatingPointError(f"the corrected eigenvalues of {n} have non-finite entries; try "
                                     "accumulate_dtype='float64'")
    corr = EigenCorrection(values, count, factors_id, cfg.to_dict())
    if out is not None:
        if state.is_main_process:
            corr.save(out)
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        else:
            corr.path = out / EKFAC_FILENAME
        state.wait_for_everyone()
    return corr


def _reduce(col: LambdaCollector, names: list[str], eigen: Any, world: int) -> tuple[dict[str, torch.Tensor], int]:
    """Sum the per-process sums once, on CPU (a process that saw no batch contributes zeros)."""
    sums = {n: t.cpu() for n, t in col.sums.items()}
    if world == 1:
        missing = [n for n in names if n not in sums]
        if missing:
            raise RuntimeError(f"{missing[:3]} never ran in the forward pass; are they part of the model's forward?")
        return sums, col.num_samples
    from accelerate.utils import reduce

    dev = dist_state().device
    for n in names:
        t = sums.get(n, torch.zeros(*eigen[n].shape, dtype=col.dtype))
        sums[n] = reduce(t.to(dev), reduction="sum").cpu()
    count = reduce(torch.tensor([float(col.num_samples)], dtype=torch.float64, device=dev), reduction="sum")
    return sums, int(count.item())


def _save_checkpoint(path: Path, col: LambdaCollector, next_batch: int, key: dict) -> None:
    meta = {"format": "hf_curvedit.ekfac.checkpoint", "next_batch": str(next_batch),
            "num_samples": str(col.num_samples), "key": json.dumps(key, sort_keys=True)}
    save_safetensors(path, {f"{n}.lambda": t for n, t in col.sums.items()}, meta)


def _load_checkpoint(path: Path, key: dict, col: LambdaCollector) -> int:
    """Put a checkpoint's sums into ``col``; returns the batch to continue from. A checkpoint written with other
    settings is refused; a damaged one raises `DamagedFileError`."""
    fix = "The partial pass cannot resume from it; it is discarded and the pass starts over"
    with read_safetensors(path, "an hf-curvedit EK-FAC checkpoint", fix) as f:
        meta = f.metadata
        try:
            written_with = json.loads(meta["key"])
            next_batch, num_samples = int(meta["next_batch"]), int(meta["num_samples"])
        except (KeyError, ValueError) as err:
            raise DamagedFileError(path, f"its metadata is unreadable ({err})", fix) from None
        if written_with != json.loads(json.dumps(key, sort_keys=True)):
            raise InputError(f"{path} was written for other factors or settings; resume with the same ones, or "
                             f"{RESTART} to start over")
        for k in f.keys():
            col.sums[k.removesuffix(".lambda")] = f.get(k)
    col.num_samples = num_samples
    return next_batch

