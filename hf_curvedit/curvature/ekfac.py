"""`fit_eigen_correction`: the EK-FAC pass, a second resumable, multi-process pass over the data that measures the
curvature of every component of a weight in its K-FAC eigenbasis (see `correction.py` for what is measured, and
`lambdas.py` for how), for linear layers and for each expert of an expert projection, on the same engine as the
factor pass (`passes.py`): partitions of the memory budget, spread over processes, streamed to disk.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
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
from .config import FactorConfig, accumulator_dtype
from .correction import EKFAC_FILENAME, EKFAC_STEM, EigenCorrection, store_metadata
from .decompose import module_basis
from .distributed import dist_state
from .eigen import ModuleEigen
from .fit import one_processor, parameter_device
from .lambdas import LambdaCollector
from .partitions import plan_partitions, split_expert_slice
from .passes import PassSpec, run_pass
from .storage import FACTORS_STEM, RESTART, KFACFactors, load_factors
from .tasks import FactorTask, task_for

__all__ = ["LambdaCollector", "fit_eigen_correction"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "ekfac_checkpoint"


def check_bases(targets: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse bases (module → (d_out, d_in), or (experts, d_out, d_in)) that are not targets of this model or have
    another shape."""
    missing = [n for n in shapes if n not in targets]
    if missing:
        raise InputError(f"{missing[:3]} are not linear layers or expert projections of this model; the factors "
                         "belong to another model")
    wrong = [f"{n}: bases for {tuple(s)}, the model has {targets[n].shape}" for n, s in shapes.items()
             if tuple(targets[n].shape) != tuple(s)]
    if wrong:
        raise InputError(f"the factors do not match this model ({'; '.join(wrong[:3])}); fit factors for this "
                         "model, or load the model they were fitted on")


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
    share the passes (and the eigendecomposition) as in `fit_factors`. An expert projection gets one Λ per expert, over
    the tokens routed to it (see `lambdas.py`).
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
    check_bases(targets, {n: tuple(s) for n, s in fitted.model_info.get("module_shapes", {}).items()})
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
    task = task_for(model, task)
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
    experts = {n: targets[n].num_experts for n in names if targets[n].is_experts}

    def device(entry: str) -> torch.device:
        return parameter_device(targets[split_expert_slice(entry)[0]])

    spec = PassSpec(
        desc="EK-FAC eigenvalues", stem=EKFAC_STEM, checkpoint_dir=CHECKPOINT_DIR,
        key={"factors_id": factors_id, "config": cfg.collection_key(), "world_size": state.num_processes,
             "partitions": partitions},
        collector=lambda part: LambdaCollector(model, part, lambda entry: module_basis(eigen, entry), dtype,
                                               {entry: device(entry) for entry in part}),
        finish=lambda part, sums, st: _finish_partition(part, sums, st, targets, dtype),
        index_metadata=lambda metas: store_metadata(names, _one_count(metas), factors_id, cfg.to_dict(), experts),
    )
    kept = run_pass(model, spec, task, data, cfg, partitions, out, progress=progress,
                    device_of=lambda key: device(key.rsplit(".", 1)[0]))
    if out is not None:
        return EigenCorrection.load(out)
    assert kept is not None
    tensors = {k: t for part, _ in kept for k, t in part.items()}
    values = {n: torch.stack([tensors[f"{n}.lambda.{e}"] for e in range(experts[n])]) if n in experts
              else tensors[f"{n}.lambda"] for n in names}
    return EigenCorrection(values, _one_count([m for _, m in kept]), factors_id, cfg.to_dict())


def lambda_bytes(d_out: int, d_in: int, dtype: torch.dtype) -> int:
    """What one module holds during the EK-FAC pass: its two bases and the sum of ``Λ``, in the accumulation dtype."""
    return (d_in * d_in + d_out * d_out + d_out * d_in) * dtype.itemsize


def _finish_partition(part: list[str], sums: dict[str, torch.Tensor], st: dict[str, Any], targets: Mapping[str, Any],
                      dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    count = int(st["num_samples"])
    if count == 0:
        raise InputError("the EK-FAC pass saw no sample with a usable position; the data has no usable tokens")
    tensors = {}
    for entry in part:
        name, first, end = split_expert_slice(entry)
        t = targets[name]
        values = sums.get(f"{entry}.lambda")
        if values is None and not t.is_experts:
            raise RuntimeError(f"{name} never ran in the forward pass; is it part of the model's forward?")
        if values is None:  # no token reached these experts: nothing measured, zero curvature
            values = torch.zeros((end or t.num_experts) - (first or 0), t.d_out, t.d_in, dtype=dtype)
        values = values.div_(count)
        if not all_finite(values):
            raise FloatingPointError(f"the corrected eigenvalues of {name} have non-finite entries; try "
                                     "accumulate_dtype='float64'")
        if values.dim() == 3:  # an expert projection: one Λ per expert, by its index in the whole stack
            tensors.update({f"{name}.lambda.{(first or 0) + e}": values[e] for e in range(values.shape[0])})
        else:
            tensors[f"{name}.lambda"] = values
    return tensors, {"modules": part, "num_samples": count}


def _one_count(metas: list[dict[str, Any]]) -> int:
    # every pass reads the same data: one sample count for all
    counts = {int(m["num_samples"]) for m in metas}
    if len(counts) != 1:
        raise RuntimeError(f"the EK-FAC passes saw different numbers of samples ({sorted(counts)})")
    return counts.pop()
