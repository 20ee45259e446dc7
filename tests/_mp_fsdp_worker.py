"""Worker for test_fsdp: a model sharded with FSDP2 on 2 CPU processes (gloo), end to end.

    torchrun --nproc_per_node 2 _mp_fsdp_worker.py torch OUT            # plain torch: fully_shard per layer
    accelerate launch --use_fsdp --fsdp_version 2 ... _mp_fsdp_worker.py accelerate OUT   # accelerate's FSDP2

Fits factors, runs the EK-FAC pass, builds an edit on the sharded model, saves it (the main process), runs it
unmerged, merged and disabled, and measures its exposure; each process writes what it saw to ``rankN.json``.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from test_fsdp import CFG, PROBE, fsdp_data, fsdp_model  # noqa: E402

from hf_curvedit import (  # noqa: E402
    CurvatureEditConfig,
    FactorConfig,
    build_curvature_edit,
    fit_eigen_correction,
    fit_factors,
    load_factors,
)
from hf_curvedit.curvature import passes  # noqa: E402
from hf_curvedit.curvature.distributed import dist_state, is_sharded_model  # noqa: E402
from hf_curvedit.exposure import adapter_exposure  # noqa: E402


def shard_with_torch(model):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def shard_with_accelerate(model):
    # accelerate turns its FSDP plugin on for accelerators only; on the CPU its own FSDP2 preparation is called with
    # the plugin the launcher's --use_fsdp flags describe
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator = Accelerator()
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    assert accelerator.state.fsdp_plugin.fsdp_version == 2
    return fsdp2_prepare_model(accelerator, model)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    model = shard_with_torch(fsdp_model()) if mode in ("torch", "nodes") else shard_with_accelerate(fsdp_model())
    state = dist_state()
    assert state.num_processes == 2 and is_sharded_model(model)
    steps = []
    real = passes.collect_factor_sums

    def collect(m, batches, *a, **kw):  # which steps this process took, real (>= 0) or kept in step (-1)
        def counted():
            for b, batch in batches:
                steps.append(b)
                yield b, batch
        return real(m, counted(), *a, **kw)

    passes.collect_factor_sums = collect
    fit_factors(model, fsdp_data(), FactorConfig(**CFG), out, progress=False)
    fit_eigen_correction(model, fsdp_data(), out, progress=False)
    edited = build_curvature_edit(model, load_factors(out).eigendecompose(), CurvatureEditConfig(keep_mass=0.7))
    edited.save_pretrained(os.path.join(out, "adapter"), is_main_process=state.is_main_process)
    with torch.no_grad():
        unmerged = edited(PROBE).logits
        edited.merge_adapter()
        merged = edited(PROBE).logits
        edited.unmerge_adapter()
        with edited.disable_adapter():
            base = edited(PROBE).logits
        again = edited(PROBE).logits
    exposure = adapter_exposure(edited, {"probe": [PROBE[0].tolist()]})
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as fh:
        json.dump({"steps": steps, "unmerged": unmerged.tolist(), "merged": merged.tolist(), "base": base.tolist(),
                   "again": again.tolist(), "exposure": exposure.exposures("default")}, fh)
