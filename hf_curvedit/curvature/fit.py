"""`fit_factors`: resumable, multi-process data passes that yield K-FAC factors.

The orchestration only: the task turns batches into losses (`tasks.py`), the collector accumulates (`collector.py`),
the pass engine runs the partitions of the memory budget, spreads them over processes and streams each finished one
to disk (`passes.py`), storage reads the result back one module at a time (`storage.py`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import DataSource, load_text_dataset
from ..errors import InputError
from ..integrity import DamagedFileError, output_lock
from ..shards import TensorFiles, remove_tensor_files
from ..targets import resolve_target_modules, weight_targets
from ..utils import all_finite, execution_device
from .collector import FactorCollector, accumulator_dtype
from .config import FactorConfig
from .distributed import dist_state
from .partitions import plan_partitions, split_expert_slice
from .passes import PassSpec, run_pass
from .storage import (
    CHECKPOINT_DIR,
    FACTORS_FILENAME,
    FACTORS_STEM,
    FORMAT,
    FORMAT_VERSION,
    RESTART,
    KFACFactors,
    factor_tensors,
    model_fingerprint,
)
from .sums import mirror_upper
from .tasks import FactorTask, task_for

__all__ = ["fit_factors"]

logger = logging.getLogger(__name__)


def one_processor(processor: Any, tokenizer: Any, image_processor: Any) -> Any:
    """The one of ``processor=``, ``tokenizer=`` and ``image_processor=`` that was given (``None`` if none was)."""
    given = [p for p in (processor, tokenizer, image_processor) if p is not None]
    if len(given) > 1:
        raise InputError("pass one of processor=, tokenizer= or image_processor=, not several")
    return given[0] if given else None


def parameter_device(target: Any) -> torch.device:
    """Where a target's computation runs (see `hf_curvedit.utils.execution_device`)."""
    return execution_device(target.module, target.parameter())


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
    """Collect K-FAC factors for every target module of ``model`` over ``dataset``.

    Args:
        model: A causal LM (``AutoModelForCausalLM``-style: ``model(input_ids, attention_mask).logits``)
            or an image classifier (``AutoModelForImageClassification``: ``model(pixel_values).logits``),
            in any dtype, on any device, spread with ``device_map`` (offloaded layers included) or sharded with
            FSDP2 (``fully_shard``).
        dataset: A ``datasets.Dataset``/``IterableDataset`` (a text or ``input_ids`` column for a language
            model; an image or ``pixel_values`` column, and a label column for empirical labels, for an
            image classifier), a local file or folder, or a dataset name.
        config: What to collect (targets, label mode, block size, token budget, token positions, memory budget); see
            :class:`FactorConfig`.
        output_dir: Where the factors and resumable checkpoints go. With it, each finished data pass (a partition
            of ``max_factor_memory_gb``) is written to disk and freed before the next one, and the returned factors
            are read from disk one module at a time. Without it nothing is written, nothing can be resumed, and the
            factors are kept in memory.
        processor: What turns raw data into model inputs: the tokenizer (raw text) or the image processor (images,
            e.g. ``AutoImageProcessor.from_pretrained(...)``). Not needed for ``input_ids``/``pixel_values`` data.
        tokenizer, image_processor: The same as ``processor``, by their specific names.
        task: How batches become losses and which positions are samples (see `FactorTask`); by default
            :func:`default_task` picks `CausalLMTask` or `ImageClassificationTask` from the model.
        resume: Continue from the finished passes and checkpoints in ``output_dir`` if there are any (default).
            ``False`` deletes them.
        progress: Show a tqdm bar (tokens/s, or images/s for an image classifier).

    Under ``accelerate launch``/``torchrun`` with an ``output_dir``, each process collects its own partitions over
    all the data (``P`` partitions take ⌈P/N⌉ passes on ``N`` processes; with fewer partitions than processes, the
    processes of a partition split its data). Without an ``output_dir``, or for a sharded model, the processes split
    the data of every partition. The result equals a one-process fit up to float round-off.

    One run writes to ``output_dir`` at a time: a second one (another process) gets `FolderInUseError`. Factors there
    that do not verify (damaged bytes, a truncated file) are not used: they are collected again, with a warning.
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
    task = task_for(model, task)
    processor = one_processor(processor, tokenizer, image_processor)
    task.validate(model, cfg)
    state = dist_state()
    names = resolve_target_modules(model, cfg.target_modules, exclude_modules=cfg.exclude_modules)
    info = model_fingerprint(model, names)
    out = Path(output_dir) if output_dir is not None else None

    if out is not None and resume and TensorFiles.exists(out, FACTORS_STEM):
        done = _finished(out, cfg, info)
        if done is not None:
            return done
        resume = False
    if out is not None and not resume and state.is_main_process:
        import shutil

        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        remove_tensor_files(out, FACTORS_STEM)
    state.wait_for_everyone()

    data = task.prepare_data(model, load_text_dataset(dataset), cfg, processor)
    partitions = plan_partitions(model, names, cfg)
    if len(partitions) > 1:
        logger.info("memory budget splits %d modules into %d partitions (one data pass each)", len(names),
                    len(partitions))
    targets = weight_targets(model)
    dtype = accumulator_dtype(cfg)
    spec = PassSpec(
        desc="K-FAC factors", stem=FACTORS_STEM, checkpoint_dir=CHECKPOINT_DIR,
        key={"config": cfg.collection_key(), "model": info, "world_size": state.num_processes,
             "partitions": partitions},
        collector=lambda part: FactorCollector(model, part, dtype),
        finish=lambda part, sums, st: _finish_partition(part, sums, st, targets, task, cfg, dtype,
                                                        state.num_processes),
        index_metadata=lambda metas: _store_metadata(metas, names, cfg, info),
    )
    kept = run_pass(model, spec, task, data, cfg, partitions, out, progress=progress,
                    device_of=lambda key: parameter_device(targets[split_expert_slice(key.rsplit(".", 1)[0])[0]]))
    if out is not None:
        return KFACFactors.load(out)
    return _in_memory(kept, names, targets, cfg, info)


def _finished(out: Path, cfg: FactorConfig, info: dict) -> KFACFactors | None:
    """The factors already in ``out`` when they were fitted with these settings for this model; ``None`` when they
    do not verify (collected again, with a warning). Other settings: FileExistsError."""
    try:
        done = KFACFactors.load(out)
        done._store.verify()  # every tensor, once: a damaged store is collected again, never returned
    except DamagedFileError as err:
        logger.warning("%s; collecting the factors again", err)
        return None
    if done.config.collection_key() == cfg.collection_key() and done.model_info.get("module_shapes") == \
            info["module_shapes"]:
        logger.info("factors already complete in %s; loading them", out)
        return done
    raise FileExistsError(
        f"{out / FACTORS_FILENAME} exists and was fitted with other settings or for another model. "
        f"Choose another output folder, or {RESTART} to overwrite it."
    )


def _finish_partition(part: list[str], sums: dict[str, torch.Tensor], st: dict[str, Any], targets: dict,
                      task: FactorTask, cfg: FactorConfig, dtype: torch.dtype,
                      world: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A reduced partition's stored tensors (normalized, in the storage dtype, one pair per expert) and its record:
    its entries, their sample counts and shared inputs."""
    alias, counts = st["a_alias"], st["count"]
    hint = getattr(task, "zero_gradient_hint", "")
    tensors: dict[str, torch.Tensor] = {}
    for entry in part:
        name, first, end = split_expert_slice(entry)
        t = targets[name]
        A, G = sums.get(f"{entry}.A"), sums.get(f"{entry}.G")
        if G is None:
            if not t.is_experts and world == 1:
                raise RuntimeError(f"{name} never ran in the forward pass; is it part of the model's forward?")
            stack = ((end or t.num_experts) - (first or 0),) if t.is_experts else ()
            G = torch.zeros(*stack, t.d_out, t.d_out, dtype=dtype)
            A = None if entry in alias else torch.zeros(*stack, t.d_in, t.d_in, dtype=dtype)
        owns_A = entry not in alias
        A = mirror_upper(A) if owns_A else None
        G = mirror_upper(G)
        G, A = _normalize(entry, A, G, counts[entry], hint)
        for kind, f in (("A", A), ("G", G)):
            if f is not None and not all_finite(f):
                raise FloatingPointError(_nonfinite_message(kind, name, f"{entry}.{kind}" in st["nonfinite"]))
        if cfg.storage_dtype is not None:
            store = getattr(torch, cfg.storage_dtype)
            A, G = (A.to(store) if A is not None else None), G.to(store)
        if t.is_experts:  # one pair per expert, by its index in the whole stack
            offset = first or 0
            for kind, f in (("A", A), ("G", G)):
                if f is not None:
                    tensors.update({f"{name}.{kind}.{offset + e}": f[e] for e in range(f.shape[0])})
        else:
            tensors.update(factor_tensors(name, A, G, experts=False))
    return tensors, {"entries": part, "num_tokens": counts, "a_alias": alias}


def _nonfinite_message(kind: str, name: str, from_samples: bool) -> str:
    what = "inputs" if kind == "A" else "output gradients"
    if from_samples:
        return (f"factor {kind} of {name} has non-finite entries: its {what} held NaN or inf, so the model computed "
                f"them there (check its dtype and inputs; an offloaded or sharded layer must run through its own "
                f"forward hooks)")
    return (f"factor {kind} of {name} has non-finite entries although every sample of its {what} was finite: the sum "
            "overflowed; try accumulate_dtype='float64'")


def _normalize(name: str, A: torch.Tensor | None, G: torch.Tensor, count: int | list[int],
               hint: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divide the sums of ``name`` by its sample count (per expert for an expert projection, in place), and refuse
    factors no sample or no gradient reached."""
    if isinstance(count, list):  # an expert projection: one count per expert
        # An expert that no token reached keeps all-zero factors; the edit never uses it (min_expert_tokens).
        scale = torch.tensor([1.0 / c if c else 0.0 for c in count], dtype=G.dtype, device=G.device).view(-1, 1, 1)
        G.mul_(scale)
        seen = [e for e, c in enumerate(count) if c]
        dead = [e for e in seen if not bool(G[e].diagonal().any())]
        if dead:
            raise InputError(f"no gradient reached experts {dead[:5]} of {name} at the sampled positions, so their G "
                             f"factors are zero.{hint}")
        if A is not None:
            A.mul_(scale.to(A.dtype))
        return G, A
    if count == 0:
        raise InputError(f"no valid token positions reached {name}; the data has no usable tokens")
    G.div_(count)
    if not bool(G.diagonal().any()):
        raise InputError(f"no gradient reached {name} at the sampled positions, so its G factor is zero: the module "
                         f"does not take part in computing the logits there.{hint}")
    if A is not None:
        A.div_(count)
    return G, A


def _store_metadata(metas: list[dict[str, Any]], names: list[str], cfg: FactorConfig, info: dict) -> dict[str, Any]:
    """The store's record from its partitions': every module's sample counts (an expert projection's slices joined
    in order) and shared inputs."""
    counts: dict[str, Any] = {}
    slices: dict[str, list[tuple[int, list[int]]]] = {}
    alias: dict[str, str] = {}
    for meta in metas:
        alias.update(meta["a_alias"])
        for entry, c in meta["num_tokens"].items():
            name, first, _ = split_expert_slice(entry)
            if first is None:
                counts[name] = c
            else:
                slices.setdefault(name, []).append((first, c))
    for name, parts in slices.items():
        counts[name] = [c for _, part in sorted(parts) for c in part]
    if not any(isinstance(counts.get(n), list) and any(counts[n]) or not isinstance(counts.get(n), list)
               for n in names):
        raise InputError("no valid token position was routed to any expert; the data has no usable tokens")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "factors_id": uuid.uuid4().hex, "modules": names,
            "a_alias": alias, "num_tokens": {n: counts[n] for n in names}, "config": cfg.to_dict(),
            "model_info": info}


def _in_memory(kept: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None, names: list[str], targets: dict,
               cfg: FactorConfig, info: dict) -> KFACFactors:
    """The factors of a fit without an output folder, from its partitions' tensors (on the CPU)."""
    assert kept is not None
    tensors = {k: t for part, _ in kept for k, t in part.items()}
    meta = _store_metadata([m for _, m in kept], names, cfg, info)
    A: dict[str, torch.Tensor] = {}
    G: dict[str, torch.Tensor] = {}
    for n in names:
        experts = targets[n].num_experts
        for kind, into in (("A", A), ("G", G)):
            if kind == "A" and n in meta["a_alias"]:
                continue
            into[n] = (torch.stack([tensors[f"{n}.{kind}.{e}"] for e in range(experts)]) if experts
                       else tensors[f"{n}.{kind}"])
    for n, owner in meta["a_alias"].items():
        A[n] = A[owner]
    return KFACFactors(A=A, G=G, num_tokens=meta["num_tokens"], config=cfg, model_info=info, a_alias=meta["a_alias"],
                       factors_id=meta["factors_id"])
