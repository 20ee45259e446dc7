"""`fit_factors`: one resumable, multi-process pass over the data that yields K-FAC factors.

The orchestration only: the task turns batches into losses (`tasks.py`), the collector accumulates (`collector.py`),
storage writes and resumes (`storage.py`). Under ``accelerate launch``/``torchrun`` each process takes every
``world_size``-th batch and the sums are reduced once at the end.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data import DataSource, count_batches, iter_batches, load_text_dataset
from ..errors import InputError
from ..integrity import DamagedFileError, output_lock
from ..targets import resolve_target_modules, weight_targets
from ..utils import all_finite
from .collector import FactorCollector, accumulator_dtype, collect_factor_sums
from .config import FactorConfig
from .distributed import dist_state
from .partitions import plan_partitions, split_expert_slice
from .storage import (
    CHECKPOINT_DIR,
    FACTORS_FILENAME,
    RESTART,
    KFACFactors,
    checkpoint_file,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from .tasks import FactorTask, default_task

__all__ = ["fit_factors"]

logger = logging.getLogger(__name__)


def pass_bar(desc: str, task: FactorTask, data: Any, cfg: FactorConfig, n_batches: int | None, start: int,
             progress: bool) -> tqdm:
    """The progress bar of this process's share of a data pass from batch ``start``: every ``world_size``-th batch,
    counted in the task's samples (shown on the main process only)."""
    state = dist_state()
    total = None
    if n_batches is not None:
        mine = len([b for b in range(start, n_batches) if b % state.num_processes == state.process_index])
        total = mine * cfg.batch_size * data.samples_per_row
    return tqdm(total=total, unit=task.unit, unit_scale=True, dynamic_ncols=True, desc=desc,
                disable=not (progress and state.is_main_process))


def one_processor(processor: Any, tokenizer: Any, image_processor: Any) -> Any:
    """The one of ``processor=``, ``tokenizer=`` and ``image_processor=`` that was given (``None`` if none was)."""
    given = [p for p in (processor, tokenizer, image_processor) if p is not None]
    if len(given) > 1:
        raise InputError("pass one of processor=, tokenizer= or image_processor=, not several")
    return given[0] if given else None


def fit_factors(
    model: nn.Module,
    dataset: DataSource,
    config: FactorConfig | None = None,
    output_dir: str | Path | None = None,
    *,
    processor: Any = None,
    tokenizer: Any = None,
    image_processor: Any = None,
    task: FactorTask | None = None,
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
        processor: What turns raw data into model inputs: the tokenizer (raw text) or the image processor (images,
            e.g. ``AutoImageProcessor.from_pretrained(...)``). Not needed for ``input_ids``/``pixel_values`` data.
        tokenizer, image_processor: The same as ``processor``, by their specific names.
        task: How batches become losses and which positions are samples (see `FactorTask`); by default
            :func:`default_task` picks `CausalLMTask` or `ImageClassificationTask` from the model.
        resume: Continue from a checkpoint in ``output_dir`` if one exists (default). ``False`` deletes it.
        progress: Show a tqdm bar (tokens/s, or images/s for an image classifier) on the main process.

    Under ``accelerate launch``/``torchrun`` each process takes every ``world_size``-th batch, the
    factor sums are reduced once at the end, and only the main process writes the result.

    One run writes to ``output_dir`` at a time: a second one (another process) gets `FolderInUseError`. A
    ``factors.safetensors`` or checkpoint there that does not verify (damaged bytes, a truncated file) is not used:
    it is collected again, with a warning.
    """
    state = dist_state()
    lock = (output_lock(output_dir, "fit_factors") if output_dir is not None and state.is_main_process
            else contextlib.nullcontext())
    with lock:
        return _fit_factors(model, dataset, config, output_dir, processor=processor, tokenizer=tokenizer,
                            image_processor=image_processor, task=task, resume=resume, progress=progress)


def _fit_factors(model: nn.Module, dataset: DataSource, config: FactorConfig | None, output_dir: str | Path | None,
                 *, processor: Any, tokenizer: Any, image_processor: Any, task: FactorTask | None, resume: bool,
                 progress: bool) -> KFACFactors:
    cfg = config or FactorConfig()
    task = task or default_task(model)
    processor = one_processor(processor, tokenizer, image_processor)
    task.validate(model, cfg)
    state = dist_state()
    rank, world = state.process_index, state.num_processes
    names = resolve_target_modules(model, cfg.target_modules, exclude_modules=cfg.exclude_modules)
    info = model_fingerprint(model, names)
    out = Path(output_dir) if output_dir is not None else None

    done = None
    if out is not None and (out / FACTORS_FILENAME).exists() and resume:
        try:
            done = KFACFactors.load(out)
        except DamagedFileError as err:
            logger.warning("%s; collecting the factors again", err)
            resume = False
    if done is not None:
        if (done.config.collection_key() == cfg.collection_key()
                and done.model_info.get("module_shapes") == info["module_shapes"]):
            logger.info("factors already complete in %s; loading them", out)
            return done
        raise FileExistsError(
            f"{out / FACTORS_FILENAME} exists and was fitted with other settings or for another model. "
            f"Choose another output folder, or {RESTART} to overwrite it."
        )
    if out is not None and not resume and state.is_main_process:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        (out / FACTORS_FILENAME).unlink(missing_ok=True)
    state.wait_for_everyone()

    data = task.prepare_data(model, load_text_dataset(dataset), cfg, processor)
    n_batches = count_batches(data.rows, cfg.batch_size, data.max_rows)
    key = {"config": cfg.collection_key(), "model": info, "world_size": world}
    partitions = plan_partitions(model, names, cfg)
    if len(partitions) > 1:
        logger.info("memory budget splits %d modules into %d partitions (one data pass each)", len(names),
                    len(partitions))
    targets = weight_targets(model)

    def device_of(n: str) -> torch.device:
        return targets[split_expert_slice(n)[0]].parameter().device

    dtype = accumulator_dtype(cfg)
    A_all: dict[str, torch.Tensor] = {}
    G_all: dict[str, torch.Tensor] = {}
    count_all: dict[str, int] = {}
    alias_all: dict[str, str] = {}
    for p, part in enumerate(partitions):
        col = FactorCollector(model, part, dtype)
        start = 0
        ckpt = checkpoint_file(out, p, rank, world) if out is not None else None
        finished = False
        if ckpt is not None and ckpt.exists():
            try:
                A, G, count, alias, start, finished = load_checkpoint(ckpt, key, device_of)
            except DamagedFileError as err:
                logger.warning("%s; this part starts over", err)
                ckpt.unlink()
            else:
                col.load_state(A, G, count, alias)
                logger.info("resuming partition %d from batch %d", p, start)
        if not finished:
            bar = pass_bar(f"K-FAC factors{f' [part {p + 1}/{len(partitions)}]' if len(partitions) > 1 else ''}",
                           task, data, cfg, n_batches, start, progress)
            since = [0]

            def on_batch_end(b: int, c: FactorCollector) -> None:
                since[0] += 1
                if ckpt is not None and cfg.checkpoint_every and since[0] % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, c.A, c.G, c.count, c.a_alias, b + 1, False, key)

            batches = iter_batches(data.rows, cfg.batch_size, start_batch=start, max_blocks=data.max_rows,
                                   rank=rank, world_size=world, to_tensors=data.to_tensors)
            with bar:
                collect_factor_sums(model, batches, part, cfg, task=task, collector=col, on_batch_end=on_batch_end,
                                    progress=bar)
            if ckpt is not None:
                save_checkpoint(ckpt, col.A, col.G, col.count, col.a_alias,
                                n_batches if n_batches is not None else 1 << 62, True, key)
        A, G = col.finalized_sums()
        for n in part:
            if n not in G and world == 1 and not col.targets[n].is_experts:
                raise RuntimeError(f"{n} never ran in the forward pass; is it part of the model's forward?")
        A_all.update(A)
        G_all.update(G)
        count_all.update(col.count)
        alias_all.update(col.a_alias)
    _join_expert_slices(A_all, G_all, count_all, names, targets, dtype)

    A_all, G_all, count_all = _reduce(A_all, G_all, count_all, names, alias_all, targets, dtype, world)

    for n in names:
        _normalize(n, A_all, G_all, count_all[n], n not in alias_all, task)
    if cfg.storage_dtype is not None:
        store = getattr(torch, cfg.storage_dtype)
        A_all = {n: t.to(store) for n, t in A_all.items()}
        G_all = {n: t.to(store) for n, t in G_all.items()}
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


def _join_expert_slices(A: dict, G: dict, count: dict, names: list[str], targets: dict, dtype: torch.dtype) -> None:
    """Put each expert projection's stack back together from the slices of experts its partitions collected (and give
    zero sums to experts no token reached), in place."""
    slices: dict[str, list[str]] = {}
    for key in list(count):
        base, first, _ = split_expert_slice(key)
        if first is not None:
            slices.setdefault(base, []).append(key)
    for n in names:
        t = targets[n]
        if not t.is_experts:
            continue
        keys = sorted(slices.get(n, [n] if n in count else []), key=lambda k: split_expert_slice(k)[1] or 0)
        parts_A, parts_G, counts = [], [], []
        for k in keys:
            size = len(count[k])
            parts_A.append(A.pop(k, None) if k in A else torch.zeros(size, t.d_in, t.d_in, dtype=dtype))
            parts_G.append(G.pop(k, None) if k in G else torch.zeros(size, t.d_out, t.d_out, dtype=dtype))
            counts += count.pop(k)
        if len(counts) != t.num_experts:
            raise RuntimeError(f"the partitions of {n} cover {len(counts)} of its {t.num_experts} experts")
        device = next((x.device for x in parts_A + parts_G if x is not None), torch.device("cpu"))
        A[n] = torch.cat([x.to(device) for x in parts_A])
        G[n] = torch.cat([x.to(device) for x in parts_G])
        count[n] = counts


def _normalize(n: str, A: dict, G: dict, count: int | list[int], owns_A: bool, task: FactorTask) -> None:
    """Divide the sums of ``n`` by its sample count (per expert for an expert projection), in place, and refuse
    factors no sample or no gradient reached."""
    hint = getattr(task, "zero_gradient_hint", "")
    if isinstance(count, list):  # an expert projection: one count per expert
        if not any(count):
            raise InputError(f"no valid token position was routed to any expert of {n}; the data has no usable "
                             "tokens")
        # An expert that no token reached keeps all-zero factors; the edit never uses it (min_expert_tokens).
        scale = torch.tensor([1.0 / c if c else 0.0 for c in count], dtype=G[n].dtype).view(-1, 1, 1)
        G[n] = G[n] * scale
        seen = [e for e, c in enumerate(count) if c]
        dead = [e for e in seen if not bool(G[n][e].diagonal().any())]
        if dead:
            raise InputError(f"no gradient reached experts {dead[:5]} of {n} at the sampled positions, so their G "
                             f"factors are zero.{hint}")
        if owns_A:
            A[n] = A[n] * scale.to(A[n].dtype)
    else:
        if count == 0:
            raise InputError(f"no valid token positions reached {n}; the data has no usable tokens")
        G[n] = G[n] / count
        if not bool(G[n].diagonal().any()):
            raise InputError(f"no gradient reached {n} at the sampled positions, so its G factor is zero: the module "
                             f"does not take part in computing the logits there.{hint}")
        if owns_A:
            A[n] = A[n] / count
    for kind, t in (("A", A.get(n) if owns_A else None), ("G", G[n])):
        if t is not None and not all_finite(t):
            raise FloatingPointError(f"factor {kind} of {n} has non-finite entries; try accumulate_dtype='float64'")


def _reduce(A: dict, G: dict, count: dict, names: list[str], alias: dict, targets: dict, dtype: torch.dtype,
            world: int) -> tuple[dict, dict, dict]:
    """Sum the per-process factor sums, once, on CPU; single-process runs only move to CPU."""
    A = {n: t.cpu() for n, t in A.items()}
    G = {n: t.cpu() for n, t in G.items()}
    if world == 1:
        return A, G, dict(count)
    from accelerate.utils import reduce

    # A process that saw no batch has no accumulators: contribute zeros of the right shape.
    for n in names:
        t = targets[n]
        stack = (t.num_experts,) if t.is_experts else ()
        if n not in alias:
            A.setdefault(n, torch.zeros(*stack, t.d_in, t.d_in, dtype=dtype))
        G.setdefault(n, torch.zeros(*stack, t.d_out, t.d_out, dtype=dtype))
    dev = dist_state().device
    for n in names:
        if n not in alias:
            A[n] = reduce(A[n].to(dev), reduction="sum").cpu()
        G[n] = reduce(G[n].to(dev), reduction="sum").cpu()
    # one flat vector of every count (an expert projection contributes one per expert)
    sizes = [targets[n].num_experts or 1 for n in names]
    flat = [float(c) for n in names for c in (count[n] if isinstance(count.get(n), list)
                                              else [count.get(n, 0)] * (targets[n].num_experts or 1))]
    total = reduce(torch.tensor(flat, dtype=torch.float64, device=dev), reduction="sum").tolist()
    out, i = {}, 0
    for n, size in zip(names, sizes):
        vals = [int(v) for v in total[i:i + size]]
        out[n] = vals if targets[n].is_experts else vals[0]
        i += size
    return A, G, out
