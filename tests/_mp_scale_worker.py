"""Worker for test_scale: run under `torchrun --nproc_per_node 2 _mp_scale_worker.py OUT_DIR`.

Fits factors under a memory budget (several partitions), decomposes them into a cache of several shards and runs the
EK-FAC pass, all with both processes; records which partitions and shards each process did (``rankN.json``)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from test_scale import BUDGET_CFG, scale_data, scale_model  # noqa: E402

from hf_curvedit import FactorConfig, fit_eigen_correction, fit_factors, load_factors  # noqa: E402
from hf_curvedit.curvature import decompose, passes  # noqa: E402
from hf_curvedit.curvature.distributed import dist_state  # noqa: E402

if __name__ == "__main__":
    out_dir = sys.argv[1]
    state = dist_state()
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
    done: dict = {"passes": [], "shards": []}
    real_collect, real_write = passes.collect_factor_sums, decompose.write_shard

    def collect(model, batches, part, *args, **kwargs):
        seen = []

        def counted():
            for b, batch in batches:
                seen.append(b)
                yield b, batch

        result = real_collect(model, counted(), part, *args, **kwargs)
        done["passes"].append({"modules": list(part), "batches": seen})
        return result

    def write(folder, filename, tensors, metadata):
        done["shards"].append(filename)
        return real_write(folder, filename, tensors, metadata)

    passes.collect_factor_sums, decompose.write_shard = collect, write
    decompose.EIGEN_SHARD_BYTES = 12_000  # a cache of several shards
    fit_factors(scale_model(), scale_data(), FactorConfig(**BUDGET_CFG), out_dir, progress=False)
    load_factors(out_dir).eigendecompose()
    fit_eigen_correction(scale_model(), scale_data(), out_dir, progress=False)
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as fh:
        json.dump(done, fh)
