"""A factor task of the user's own (examples/custom_task.py): subclasses of CausalLMTask for a sequence classifier and
an encoder-decoder are accepted, their factors are the per-token brute force, and their edits load bit for bit through
every stock loader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from packaging.version import Version
from peft import AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification, PeftModel
from testing_utils import assert_reloads_the_same, record_module_io
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors

_spec = importlib.util.spec_from_file_location("custom_task", Path(__file__).parents[1] / "examples" / "custom_task.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
AUTO_PEFT = {"bert": AutoPeftModelForSequenceClassification, "t5": AutoPeftModelForSeq2SeqLM}
AUTO_MODEL = {"bert": AutoModelForSequenceClassification, "t5": AutoModelForSeq2SeqLM}
# transformers before 5.8 maps an adapter's `base_model.model.model.` keys and no others in `load_adapter` (and in
# from_pretrained of an adapter folder), so BERT's `bert.` and T5's `encoder.` adapters load nothing there, any PEFT
# method's: the edit's layers then refuse to run rather than pass the base model off as the edit.
OLD_LOAD_ADAPTER = Version(transformers.__version__) < Version("5.8")
TRANSFORMERS_PATHS = {"from_pretrained(adapter folder)", "load_adapter"}


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_a_causal_lm_task_subclass_fits_edits_and_loads_through_every_stock_path(name, tmp_path):
    model = example.tiny_models()[name]
    task, targets = example.TASKS[name]
    ids = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="a subclass of CausalLMTask"):  # the default task refuses the head by name
        fit_factors(model, Dataset.from_dict({"input_ids": ids.tolist()}), FactorConfig(seq_len=12),
                    progress=False)
    factors = fit_factors(model, Dataset.from_dict({"input_ids": ids.tolist()}),
                          FactorConfig(seq_len=12, batch_size=4, target_modules=targets, accumulate_dtype="float64"),
                          task=task, progress=False)

    # A: every position of every block is a sample (the encoder's and the decoder's alike)
    names = list(factors.module_names)
    kw = {"decoder_input_ids": model._shift_right(ids)} if name == "t5" else {}
    with torch.no_grad(), record_module_io(model, names) as (ins, _):
        model(input_ids=ids, **kw)
    for n in names:
        a = ins[n].reshape(-1, ins[n].shape[-1]).double()
        assert factors.num_tokens[n] == ids.numel()
        torch.testing.assert_close(factors.A[n], a.T @ a / ids.numel(), rtol=1e-4, atol=1e-7)  # a float32 model
        assert torch.isfinite(factors.G[n]).all() and factors.G[n].trace() > 0

    model.save_pretrained(tmp_path / "base")
    loader = type(model)
    edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.8, target_modules=targets))
    edited.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    edited.save_pretrained(tmp_path / "edit")
    x = dict(input_ids=ids[:2], **({"decoder_input_ids": ids[:2]} if name == "t5" else {}))

    def logits(m):
        return m(**x).logits

    with torch.no_grad():
        out, base = logits(edited), logits(loader.from_pretrained(tmp_path / "base"))
        assert not torch.allclose(out, base), "the edit changes nothing"
        with edited.disable_adapter():
            assert torch.equal(logits(edited), base)
        paths = {
            "PeftModel.from_pretrained": PeftModel.from_pretrained(loader.from_pretrained(tmp_path / "base"),
                                                                   tmp_path / "edit"),
            AUTO_PEFT[name].__name__: AUTO_PEFT[name].from_pretrained(tmp_path / "edit"),
            "from_pretrained(adapter folder)": AUTO_MODEL[name].from_pretrained(tmp_path / "edit"),
        }
        plain = loader.from_pretrained(tmp_path / "base")
        plain.load_adapter(str(tmp_path / "edit"))
        paths["load_adapter"] = plain
        for path, loaded in paths.items():
            if OLD_LOAD_ADAPTER and path in TRANSFORMERS_PATHS:
                with pytest.raises(RuntimeError, match="has no weights yet"):
                    logits(loaded.eval())
                continue
            assert torch.equal(logits(loaded.eval()), out), f"{name}: {path} differs"
        merged = paths["PeftModel.from_pretrained"].merge_and_unload()
        merged.save_pretrained(tmp_path / "merged")
        torch.testing.assert_close(logits(merged), out, rtol=1e-4, atol=1e-5)
        assert_reloads_the_same(merged, loader.from_pretrained(tmp_path / "merged"), logits, name)
