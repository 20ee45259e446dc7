"""Worker for test_factors_multiprocess: run under `torchrun --nproc_per_node 2`."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from test_factors_multiprocess import CFG, _data  # noqa: E402
from testing_utils import tiny_llama  # noqa: E402

from hf_curvedit import FactorConfig, fit_eigen_correction, fit_factors  # noqa: E402
from hf_curvedit.curvature.fit import dist_state  # noqa: E402

if __name__ == "__main__":
    out_dir = sys.argv[1]
    fit_factors(tiny_llama(), _data(), FactorConfig(**CFG), out_dir, progress=False)
    fit_eigen_correction(tiny_llama(), _data(), out_dir, progress=False)
    state = dist_state()
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
    with open(os.path.join(out_dir, f"rank{state.process_index}.done"), "w") as fh:
        fh.write("ok")
