"""Planning a factor fit before running it: accumulator memory, partitions, data passes, eigendecomposition memory,
and the adapter size an edit can reach, from a model's shapes alone.

A plan needs no weights: a config is instantiated with fake tensors (shapes without memory: a 70B plan allocates
nothing) and one forward pass on them finds the modules that read the same input (gate and up projections share one
A factor), as `fit_factors` does on real data. The partitions come from `plan_partitions`, the very function
`fit_factors` uses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError
from ..targets import resolve_target_modules, weight_targets
from ..utils import parse_dtype
from .collector import accumulator_dtype, input_device
from .config import FactorConfig
from .decompose import EIGEN_SHARD_BYTES
from .distributed import wall_passes
from .ekfac import lambda_bytes
from .partitions import plan_partitions, split_expert_slice
from .sums import InputSharing
from .tasks import FactorTask, default_task
from .transient import dense_routing, shapes_only, transient_bytes

__all__ = ["FactorPlan", "ModulePlan", "eigh_peak_bytes", "plan_factors"]

# Bytes per element of the stored adapter factors (float32) and of a dense bf16 weight.
_ADAPTER_ELEMENT = 4
_DENSE_BF16_ELEMENT = 2
# Peak memory of `symmetric_eigh` for an n×n factor, above the factor itself, in n² float64 matrices: the float64
# copy, its symmetrized sum, LAPACK's eigenvectors and workspace, the reordered result. benchmarks/scale_7b.py measured
# 4.2 (n = 4096) and 4.0 (n = 11008) on CPU; the estimate rounds up.
EIGH_PEAK_MATRICES = 4.5


def eigh_peak_bytes(n: int) -> int:
    """Estimated peak memory of eigendecomposing one n×n factor in float64 (see ``EIGH_PEAK_MATRICES``)."""
    return int(EIGH_PEAK_MATRICES * n * n * 8)


@dataclass
class ModulePlan:
    """One target's share of the plan (a linear layer, or an expert projection: one factor pair per expert).

    Attributes:
        a_bytes: bytes of its A accumulator(s) (0 when it shares the A of ``shares_a_with``).
        g_bytes: bytes of its G accumulator(s).
        partition: index of the (first) data pass that collects it; an expert projection too large for the budget is
            split across its experts over several passes (`FactorPlan.partitions` names the slices).
        num_experts: the number of experts of an expert projection (``None`` for a linear layer).
        adapter_max_bytes: the largest adapter the edit can store (rank k = min(d_out, d_in), float32 factors, per
            expert).
        dense_break_even_rank: the rank above which the factorization ``(d_in + d_out)·k`` is larger than the dense
            ``d_out·d_in`` weight (the adapter then runs the dense W').
        weight_bf16_bytes: the weight itself in bf16, for comparison.
    """

    name: str
    d_out: int
    d_in: int
    a_bytes: int
    g_bytes: int
    shares_a_with: str | None
    partition: int
    adapter_max_bytes: int
    dense_break_even_rank: int
    weight_bf16_bytes: int
    num_experts: int | None = None

    def adapter_bytes(self, rank: int) -> int:
        """Bytes of a stored factorization of this rank (float32 factors, per expert)."""
        return (self.d_in + self.d_out) * rank * _ADAPTER_ELEMENT * (self.num_experts or 1)


@dataclass
class FactorPlan:
    """What `fit_factors` will allocate and do for a model and a `FactorConfig` (see `plan_factors`)."""

    model_type: str | None
    accumulate_dtype: str
    max_factor_memory_gb: float | None
    modules: list[ModulePlan] = field(default_factory=list)
    partitions: list[list[str]] = field(default_factory=list)
    num_processes: int = 1
    ekfac_partitions: list[list[str]] = field(default_factory=list)
    # what one batch's forward and backward hold besides the accumulators (see `_backward_transient`)
    transient_bytes: int = 0

    @property
    def data_passes(self) -> int:
        """Passes over the data: one per partition."""
        return len(self.partitions)

    @property
    def wall_passes(self) -> int:
        """Passes one after the other when ``num_processes`` share the partitions (each process collects its own
        partitions over all the data: ⌈P/N⌉)."""
        return wall_passes(self.data_passes, self.num_processes)

    @property
    def ekfac_wall_passes(self) -> int:
        """The same for the EK-FAC pass, whose partitions hold each module's two bases and its Λ sum."""
        return wall_passes(len(self.ekfac_partitions), self.num_processes)

    @property
    def process_bytes(self) -> int:
        """What one process holds at most during the fit, above the model: one partition at a time (the largest one)
        and one batch's backward transient."""
        return self.accumulator_bytes + self.transient_bytes

    def partition_bytes(self) -> list[int]:
        """Accumulator bytes of each partition (what is held during its pass); a module shares A only with a module
        of its own partition."""
        by_name = {m.name: m for m in self.modules}
        out = []
        for part in self.partitions:
            total = 0
            for entry in part:
                name, first, end = split_expert_slice(entry)
                m = by_name[name]
                # a module sharing A with one of another pass holds an A of its own (the owner's size) in this one
                a = by_name[m.shares_a_with].a_bytes if m.shares_a_with and m.shares_a_with not in part else m.a_bytes
                share = (end - first) / m.num_experts if first is not None else 1.0
                total += int((a + m.g_bytes) * share)
            out.append(total)
        return out

    @property
    def accumulator_bytes(self) -> int:
        """Peak accumulator memory: the largest partition."""
        return max(self.partition_bytes(), default=0)

    @property
    def eigen_peak_bytes(self) -> int:
        """Peak memory of the eigendecomposition (one factor at a time, the largest one)."""
        return max((eigh_peak_bytes(max(m.d_out, m.d_in)) for m in self.modules), default=0)

    def eigen_units(self) -> list[int]:
        """Bytes of each basis the eigen cache stores (a factor's eigenvectors and eigenvalues; per expert)."""
        elt = 8 if self.accumulate_dtype == "float64" else 4
        out = []
        for m in self.modules:
            sides = ([] if m.shares_a_with else [m.d_in]) + [m.d_out]
            out += [d * d * elt + d * 8 for d in sides for _ in range(m.num_experts or 1)]
        return out

    @property
    def eigen_cache_bytes(self) -> int:
        """The eigen cache on disk."""
        return sum(self.eigen_units())

    @property
    def eigen_process_bytes(self) -> int:
        """What one process holds at most while the factors are eigendecomposed into their cache: one factor's
        decomposition, the factor itself, and the cache shard being filled."""
        largest = max((max(m.d_out, m.d_in) for m in self.modules), default=0)
        factor = largest * largest * (8 if self.accumulate_dtype == "float64" else 4)
        shard = min(self.eigen_cache_bytes, max([EIGEN_SHARD_BYTES, *self.eigen_units()]))
        return self.eigen_peak_bytes + factor + shard

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(data_passes=self.data_passes, wall_passes=self.wall_passes, partition_bytes=self.partition_bytes(),
                   accumulator_bytes=self.accumulator_bytes, eigen_peak_bytes=self.eigen_peak_bytes,
                   process_bytes=self.process_bytes, eigen_process_bytes=self.eigen_process_bytes,
                   eigen_cache_bytes=self.eigen_cache_bytes,
                   ekfac_wall_passes=self.ekfac_wall_passes)
        return out

    def to_table(self) -> str:
        """The plan as text: one row per module shape group, then the totals."""
        rows = [f"{'module':<44}{'experts':>8}{'d_out':>7}{'d_in':>7}{'A':>10}{'G':>10}{'pass':>6}{'adapter ≤':>11}"
                f"{'bf16 W':>10}{'dense at k ≥':>14}"]
        passes = {}
        for p, part in enumerate(self.partitions):
            for entry in part:
                passes.setdefault(split_expert_slice(entry)[0], []).append(p + 1)
        for m in self.modules:
            a = "shared" if m.shares_a_with else _gib(m.a_bytes)
            ps = passes.get(m.name, [m.partition + 1])
            where = str(ps[0]) if len(ps) == 1 else f"{ps[0]}-{ps[-1]}"
            rows.append(f"{m.name:<44}{m.num_experts or '':>8}{m.d_out:>7}{m.d_in:>7}{a:>10}{_gib(m.g_bytes):>10}"
                        f"{where:>6}{_gib(m.adapter_max_bytes):>11}{_gib(m.weight_bf16_bytes):>10}"
                        f"{m.dense_break_even_rank:>14}")
        budget = f"{self.max_factor_memory_gb:g} GiB" if self.max_factor_memory_gb is not None else "none"
        procs = self.num_processes
        rows += [
            "",
            f"modules: {len(self.modules)}   accumulators in {self.accumulate_dtype}   budget: {budget}   "
            f"processes: {procs}",
            f"data passes (partitions): {self.data_passes}"
            + (f", {self.wall_passes} one after the other on {procs} processes" if procs > 1 else "")
            + f"   accumulator memory per process, largest pass: {_gib(self.accumulator_bytes)}   all passes: "
            f"{_gib(sum(self.partition_bytes()))}",
            f"one batch's forward and backward (activations kept for the backward, logits and their gradient): "
            f"≈ {_gib(self.transient_bytes)}; per process above the model ≈ {_gib(self.process_bytes)}",
            (f"EK-FAC pass (fit --ekfac): {len(self.ekfac_partitions)} data passes"
             + (f", {self.ekfac_wall_passes} one after the other" if procs > 1 else "")) if self.ekfac_partitions else
            "EK-FAC pass (fit --ekfac): one module's two bases and its Λ do not fit the budget; give it a larger one",
            f"eigendecomposition (fp64, one factor at a time): peak ≈ {_gib(self.eigen_peak_bytes)} above the factor; "
            f"per process with the factor and one cache shard ≈ {_gib(self.eigen_process_bytes)}",
            f"adapters (float32 B, Q; rank k ≤ min(r, s) ≤ min(d_out, d_in)): at most "
            f"{_gib(sum(m.adapter_max_bytes for m in self.modules))} in all, against "
            f"{_gib(sum(m.weight_bf16_bytes for m in self.modules))} of bf16 weights",
        ]
        return "\n".join(rows)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.3f}G" if n >= 1024**3 // 100 else f"{n / 1024**2:.2f}M"


def plan_factors(model_or_config: Any, config: FactorConfig | None = None, *,
                 task: FactorTask | None = None, num_processes: int = 1,
                 dtype: str | torch.dtype | None = None) -> FactorPlan:
    """Plan `fit_factors(model, data, config)` without data and, for a config, without weights.

    Args:
        model_or_config: a model (on any device; one on the meta device is planned from its config) or a
            transformers ``PretrainedConfig`` (e.g. ``AutoConfig.from_pretrained("allenai/OLMo-2-1124-7B")``), which
            is instantiated with fake tensors: no weight is allocated.
        config: the `FactorConfig` of the fit (targets, ``accumulate_dtype``, ``max_factor_memory_gb``).
        task: the `FactorTask` (default: `default_task` of the model); it provides the example batch of the meta
            forward that finds shared inputs.
        num_processes: the processes of a ``torchrun``/``accelerate launch`` that share the partitions (each
            collects its own, over all the data): the plan then gives the passes one after the other.
        dtype: the dtype the model runs in (``"bfloat16"``...), for the activations of one batch; a config is
            built in float32 by default, a model planned as it is.

    Returns:
        A `FactorPlan`; ``print(plan.to_table())`` shows it.
    """
    cfg = config or FactorConfig()
    with shapes_only(model_or_config, parse_dtype(dtype) if dtype is not None else None) as model:
        task = task or default_task(model)
        names = resolve_target_modules(model, cfg.target_modules, exclude_modules=cfg.exclude_modules)
        shares = _shared_inputs(model, names, task, cfg)
        transient = transient_bytes(model, names, task, cfg, dtype)
        partitions = plan_partitions(model, names, cfg)
        dtype = accumulator_dtype(cfg)
        try:
            ekfac_partitions = plan_partitions(model, names, cfg,
                                               unit_bytes=lambda t: lambda_bytes(t.d_out, t.d_in, dtype))
        except InputError:  # a module's bases and Λ alone exceed the budget: the EK-FAC pass needs a larger one
            ekfac_partitions = []
        targets = weight_targets(model)
        shapes = {n: (targets[n].d_out, targets[n].d_in, targets[n].num_experts) for n in names}
        model_type = getattr(getattr(model, "config", None), "model_type", None)
    part_of: dict[str, int] = {}
    for p, part in enumerate(partitions):
        for entry in part:
            part_of.setdefault(split_expert_slice(entry)[0], p)
    elt = accumulator_dtype(cfg).itemsize
    modules = []
    for n in names:
        d_out, d_in, experts = shapes[n]
        owner = shares.get(n)
        copies = experts or 1
        modules.append(ModulePlan(
            name=n, d_out=d_out, d_in=d_in, a_bytes=0 if owner else d_in * d_in * elt * copies,
            g_bytes=d_out * d_out * elt * copies, shares_a_with=owner, partition=part_of[n],
            adapter_max_bytes=(d_in + d_out) * min(d_in, d_out) * _ADAPTER_ELEMENT * copies,
            dense_break_even_rank=math.ceil(d_in * d_out / (d_in + d_out)),
            weight_bf16_bytes=d_in * d_out * _DENSE_BF16_ELEMENT * copies, num_experts=experts,
        ))
    if num_processes < 1:
        raise InputError(f"num_processes must be at least 1, got {num_processes}")
    return FactorPlan(model_type=model_type, accumulate_dtype=cfg.accumulate_dtype,
                      max_factor_memory_gb=cfg.max_factor_memory_gb, modules=modules, partitions=partitions,
                      num_processes=num_processes, ekfac_partitions=ekfac_partitions, transient_bytes=transient)


def _shared_inputs(model: nn.Module, names: list[str], task: FactorTask, config: FactorConfig) -> dict[str, str]:
    # One forward on meta tensors (shapes only, no compute, no memory) with the collector's own rule for shared A.
    sharing = InputSharing()
    mods = dict(model.named_modules())

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            sharing.observe(name, inputs[0])
        return record

    handles = [mods[n].register_forward_hook(hook(n)) for n in names if n in mods]  # expert projections never share
    # Experts kernels route by value (data-dependent shapes, bf16-only grouped_mm on fake tensors): the shapes-only
    # pass runs them densely, which changes no shape.
    try:
        batch = {k: v.to(input_device(model)) for k, v in task.example_batch(model, config).items()}
        with torch.no_grad(), dense_routing(model):
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return dict(sharing.alias)
