"""`fit_eigen_correction`: the EK-FAC pass, a second resumable, multi-process pass over the data that measures the
curvature of every component of a weight in its K-FAC eigenbasis (see `correction.py` for what is measured), on the
same engine as the factor pass (`passes.py`): partitions of the memory budget, spread over processes, streamed to
disk.

For each sample (a sequence, or an image) the layer's weight gradient ``D = Σ_t g_t a_tᵀ`` over its sample positions
is rotated into the eigenbasis, ``U_Gᵀ D U_A = (G_rot)ᵀ A_rot`` with ``A_rot = a U_A`` and ``G_rot = g U_G`` (the
tokens are rotated first: cheaper than rotating ``D`` while a sample has fewer positions than the layer has
features), and its square is added to ``Λ``'s sum. No weight gradient is formed by autograd; the hooks see each
layer's input and output gradient, as the factor pass does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import DataSource, load_text_dataset
from ..errors import Fix, InputError
from ..integrity import DamagedFileError, output_lock
from ..shards import TensorFiles, remove_tensor_files
from ..targets import weight_targets
from ..utils import all_finite
from .collector import _require_grad
from .config import FactorConfig, accumulator_dtype
from .correction import EKFAC_FILENAME, EKFAC_STEM, EigenCorrection, store_metadata
from .distributed import dist_state
from .eigen import ModuleEigen
from .fit import one_processor, parameter_device
from .partitions import plan_partitions
from .passes import PassSpec, run_pass
from .roots import GradientRoots
from .storage import FACTORS_STEM, RESTART, KFACFactors, load_factors
from .tasks import FactorTask, SamplePositions, default_task

__all__ = ["LambdaCollector", "fit_eigen_correction"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "ekfac_checkpoint"
# One chunk of per-sample rotated gradients holds at most this many entries (bounds the pass's extra memory).
_CHUNK_ENTRIES = 1 << 24


def check_bases(targets: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse bases (module → (d_out, d_in)) that are not linear layers of this model or have another shape."""
    experts = [n for n in shapes if n in targets and targets[n].is_experts]
    if experts:
        raise InputError(f"EK-FAC correction of expert projections is not supported ({experts[:2]}); leave them "
                         "out of the factors given to fit_eigen_correction, and edit them with "
                         "selection='curvature_mass'")
    missing = [n for n in shapes if n not in targets]
    if missing:
        raise InputError(f"{missing[:3]} are not linear layers of this model; the factors belong to another model")
    wrong = [f"{n}: bases for {tuple(s)}, the model has {targets[n].shape}" for n, s in shapes.items()
             if tuple(targets[n].shape) != tuple(s)]
    if wrong:
        raise InputError(f"the factors do not match this model ({'; '.join(wrong[:3])}); fit factors for this "
                         "model, or load the model they were fitted on")


class LambdaCollector:
    """Forward and gradient hooks that accumulate ``Σ_samples (U_Gᵀ D U_A)²`` for each module.

    The same protocol as `FactorCollector` (a context manager; `begin_batch` before a batch's forward pass,
    `end_batch` after its backward pass), so `collect_factor_sums` drives it.
    """

    def __init__(self, model: nn.Module, eigen: Mapping[str, ModuleEigen], dtype: torch.dtype):
        targets = weight_targets(model)
        check_bases(targets, {n: e.shape for n, e in eigen.items()})
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

        devices = {n: parameter_device(targets[n]) for n in eigen}
        self.U_A = {n: conv(e.eigvecs_A, devices[n]) for n, e in eigen.items()}
        self.U_G = {n: conv(e.eigvecs_G, devices[n]) for n, e in eigen.items()}
        self._sums: dict[str, torch.Tensor] = {}
        self.num_samples = 0
        self._muted = False
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

    # ---- the engine's protocol (`hf_curvedit.curvature.passes`) -----------------------------------------------
    def sums(self) -> dict[str, torch.Tensor]:
        """The running sums by name (``<module>.lambda``), to checkpoint and reduce."""
        return {f"{n}.lambda": t for n, t in self._sums.items()}

    def state(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples}

    def load(self, sums: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from a checkpoint's sums and state."""
        self._sums = {k.removesuffix(".lambda"): t for k, t in sums.items()}
        self.num_samples = int(state["num_samples"])

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        return {"num_samples": sum(int(s["num_samples"]) for s in states)}

    def begin_batch(self, positions: SamplePositions, muted: bool = False) -> None:
        """Start a batch whose sample positions are ``positions``: a (B, T) bool mask, ``"cls"`` or ``"all"``. A
        ``muted`` batch runs (its backward reaches the same modules) but adds nothing."""
        if not torch.is_tensor(positions) and positions not in ("cls", "all"):
            raise InputError(f"sample positions must be a (batch, tokens) mask, 'cls' or 'all'; got {positions!r}")
        self._muted = muted
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
            if self._positions is None or self._muted or not torch.is_grad_enabled():
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
            acc = self._sums.get(name)
            if acc is None:
                acc = self._sums[name] = torch.zeros(d_out, d_in, dtype=self.dtype, device=g_rot.device)
            elif acc.device != g_rot.device:  # resumed from a checkpoint, read to the CPU
                acc = self._sums[name] = acc.to(g_rot.device)
            step = max(1, _CHUNK_ENTRIES // (d_out * d_in))
            for s in range(0, g_rot.shape[0], step):
                # (samples, d_out, d_in): each sample's weight gradient in the eigenbasis
                rotated = torch.bmm(g_rot[s:s + step].mT, a_rot[s:s + step])
                acc += rotated.square_().sum(0)

        return grad_hook

    def end_batch(self) -> None:
        if self._muted:
            pass
        elif torch.is_tensor(self._positions):
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
    """Measure the EK-FAC corrected eigenvalues ``Λ`` of every module of ``factors`` over ``dataset``.

    Args:
        model: The model the factors were fitted on (same weights).
        dataset: The data, as for `fit_factors` (usually the same data).
        factors: Fitted K-FAC factors, or the folder `fit_factors` wrote them to; their eigenbases (cached beside
            them) are the basis of ``Λ``. Each data pass holds only the bases of its own modules.
        config: Data settings (block size, batch size, token budget, labels, seed, memory budget); defaults to the
            factors' own, so that the pass sees the same blocks and, for sampled labels, draws the same labels.
        output_dir: Where the corrected eigenvalues (``ekfac.safetensors``, or one shard per data pass and an
            index) and resumable checkpoints go; defaults to the factors' folder, where ``eigendecompose`` and
            `EigenFile` find them and attach them to the bases.
        processor: The tokenizer or image processor, when the data is raw text or images.
        tokenizer, image_processor: The same as ``processor``, by their specific names.
        task: How batches become losses (see `FactorTask`); by default picked from the model.
        resume: Continue from the finished passes and checkpoints in ``output_dir`` if there are any (default).
            ``False`` starts over.
        progress: Show a tqdm bar.

    ``max_factor_memory_gb`` of ``config`` splits the modules into data passes by what each holds (its two bases and
    its sums), as `fit_factors` does. Under ``accelerate launch``/``torchrun`` every process calls it: the processes
    share the passes (and the eigendecomposition) as in `fit_factors`. Expert projections are not supported.
    """
    processor = one_processor(processor, tokenizer, image_processor)
    state = dist_state()
    if isinstance(factors, KFACFactors):
        factors.check_model(model)
        fitted = factors
        out = Path(output_dir) if output_dir is not None else fitted.folder
    else:
        folder = Path(factors)
        if not TensorFiles.exists(folder, FACTORS_STEM):
            fix = Fix(python=f"fit_factors(model, data, config, '{folder}')",
                      cli=f"hf-curvedit fit --output-dir {folder}")
            raise FileNotFoundError(f"{folder} holds no factors; fit the factors first ({fix})")
        fitted = load_factors(folder)
        out = Path(output_dir) if output_dir is not None else folder
    cfg = config or fitted.config
    targets = weight_targets(model)
    check_bases(targets, {n: tuple(s[-2:]) if len(s) == 2 else tuple(s) for n, s in
                          fitted.model_info.get("module_shapes", {}).items()})
    # one writer per folder from the first write on: the eigen cache may be written into it too
    lock = (output_lock(out, "fit_eigen_correction") if out is not None and state.is_main_process
            else contextlib.nullcontext())
    with lock:
        # the bases are cached beside the factors (every process takes part) and read one module at a time
        eigen = fitted.eigendecompose() if fitted.folder is not None else fitted.eigendecompose(out)
        return _fit_eigen_correction(model, dataset, eigen, fitted, cfg, out, processor, task, resume, progress)


def _fit_eigen_correction(model: nn.Module, dataset: DataSource, eigen: Mapping[str, ModuleEigen],
                          fitted: KFACFactors, cfg: FactorConfig, out: Path | None, processor: Any,
                          task: FactorTask | None, resume: bool, progress: bool) -> EigenCorrection:
    task = task or default_task(model)
    task.validate(model, cfg)
    state = dist_state()
    names = list(fitted.module_names)
    factors_id = fitted.factors_id
    if out is not None and resume and TensorFiles.exists(out, EKFAC_STEM):
        try:
            done = EigenCorrection.load(out)
            done.verify()  # every tensor, once: a damaged store is measured again, never returned
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
    if out is not None and not resume and state.is_main_process:
        import shutil

        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        remove_tensor_files(out, EKFAC_STEM)
    state.wait_for_everyone()

    targets = weight_targets(model)
    dtype = accumulator_dtype(cfg)
    partitions = plan_partitions(model, names, cfg, unit_bytes=lambda t: lambda_bytes(t.d_out, t.d_in, dtype))
    data = task.prepare_data(model, load_text_dataset(dataset), cfg, processor)
    spec = PassSpec(
        desc="EK-FAC eigenvalues", stem=EKFAC_STEM, checkpoint_dir=CHECKPOINT_DIR,
        key={"factors_id": factors_id, "config": cfg.collection_key(), "world_size": state.num_processes,
             "partitions": partitions},
        collector=lambda part: LambdaCollector(model, {n: eigen[n] for n in part}, dtype),
        finish=_finish_partition,
        index_metadata=lambda metas: store_metadata(names, _one_count(metas), factors_id, cfg.to_dict()),
    )
    kept = run_pass(model, spec, task, data, cfg, partitions, out, progress=progress,
                    device_of=lambda key: parameter_device(targets[key.rsplit(".", 1)[0]]))
    if out is not None:
        return EigenCorrection.load(out)
    assert kept is not None
    values = {k.removesuffix(".lambda"): t for part, _ in kept for k, t in part.items()}
    return EigenCorrection({n: values[n] for n in names}, _one_count([m for _, m in kept]), factors_id,
                           cfg.to_dict())


def lambda_bytes(d_out: int, d_in: int, dtype: torch.dtype) -> int:
    """What one module holds during the EK-FAC pass: its two bases and the sum of ``Λ``, in the accumulation dtype."""
    return (d_in * d_in + d_out * d_out + d_out * d_in) * dtype.itemsize


def _finish_partition(part: list[str], sums: dict[str, torch.Tensor], st: dict[str, Any],
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    count = int(st["num_samples"])
    if count == 0:
        raise InputError("the EK-FAC pass saw no sample with a usable position; the data has no usable tokens")
    missing = [n for n in part if f"{n}.lambda" not in sums]
    if missing:
        raise RuntimeError(f"{missing[:3]} never ran in the forward pass; are they part of the model's forward?")
    tensors = {}
    for n in part:
        values = sums[f"{n}.lambda"].div_(count)
        if not all_finite(values):
            raise FloatingPointError(f"the corrected eigenvalues of {n} have non-finite entries; try "
                                     "accumulate_dtype='float64'")
        tensors[f"{n}.lambda"] = values
    return tensors, {"modules": part, "num_samples": count}


def _one_count(metas: list[dict[str, Any]]) -> int:
    # every pass reads the same data: one sample count for all
    counts = {int(m["num_samples"]) for m in metas}
    if len(counts) != 1:
        raise RuntimeError(f"the EK-FAC passes saw different numbers of samples ({sorted(counts)})")
    return counts.pop()
