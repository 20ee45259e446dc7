"""Write the folders of this fixture: what hf-curvedit wrote before its stores were sharded (factor, eigen and
EK-FAC files of format 1: one file each, an expert projection's factors and bases stacked, every A basis stored) and
the adapters it built from them. The files here were written by hf-curvedit at commit 257624c with

    python tests/data/legacy_v1/make.py tests/data/legacy_v1

(tests/test_scale.py checks that every stage of today's hf-curvedit reads them and builds the same adapters).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from family_configs import tiny_causal_lm  # noqa: E402
from testing_utils import random_token_rows, tiny_llama  # noqa: E402

from hf_curvedit import (  # noqa: E402
    CurvatureEditConfig,
    FactorConfig,
    build_curvature_edit,
    fit_eigen_correction,
    fit_factors,
)

ROWS = dict(n=12, lo=10, hi=20, seed=4)
CFG = dict(seq_len=16, batch_size=4, seed=2)


def llama() -> torch.nn.Module:
    return tiny_llama(seed=3)


def mixtral() -> torch.nn.Module:
    return tiny_causal_lm("mixtral", seed=3, intermediate_size=16)


def data(vocab: int) -> Dataset:
    return Dataset.from_dict({"input_ids": [[t % vocab for t in r] for r in random_token_rows(**ROWS)]})


def main(root: Path) -> None:
    model = llama()
    fit_factors(model, data(model.config.vocab_size), FactorConfig(**CFG), root / "llama", progress=False)
    fit_eigen_correction(model, data(model.config.vocab_size), root / "llama", progress=False)
    for selection in ("curvature_mass", "ekfac_mass"):
        edit = build_curvature_edit(llama(), str(root / "llama" / "eigen.safetensors"),
                                    CurvatureEditConfig(keep_mass=0.7, selection=selection))
        edit.save_pretrained(root / "llama" / f"adapter_{selection}")
    moe = mixtral()
    factors = fit_factors(moe, data(moe.config.vocab_size), FactorConfig(**CFG), root / "mixtral", progress=False)
    factors.eigendecompose()
    edit = build_curvature_edit(mixtral(), str(root / "mixtral" / "eigen.safetensors"),
                                CurvatureEditConfig(keep_mass=0.7, min_expert_tokens=1))
    edit.save_pretrained(root / "mixtral" / "adapter")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
