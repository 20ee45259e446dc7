"""Curvature factors for a head no built-in task covers: a factor task of your own.

`fit_factors` picks `CausalLMTask` for language models and refuses a classifier, a masked LM or an encoder-decoder by
name, because a next-token loss means nothing for them. A task of your own tells it what the loss is and which
positions are samples. Subclassing `CausalLMTask` keeps its tokenization and packing of general text (the factor data
stays what it is for a causal LM) and overrides two methods:

- ``sample_positions``: which (batch, token) positions are K-FAC samples;
- ``compute_loss``: the batch's loss *summed* over its samples, labels drawn from the model's own distribution
  (``label_mode="sampled"``, the true Fisher) or read from the data.

Runs offline on tiny models built from configs in a few seconds:
    python examples/custom_task.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel

from hf_curvedit import CausalLMTask, CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors
from hf_curvedit.curvature import batch_generator, sample_labels


def _sampled(logits: torch.Tensor, config: FactorConfig, batch_index: int) -> torch.Tensor:
    # seeded per batch, as the built-in tasks do: the factors do not depend on resumes or the number of processes
    with torch.no_grad():
        return sample_labels(logits.detach().float(), batch_generator(config.seed, batch_index, logits.device),
                             config.sample_chunk_size)


class SequenceClassificationTask(CausalLMTask):
    """A sequence classifier (``...ForSequenceClassification``): every real token is a sample, and the loss is the
    cross-entropy of the classes against a label drawn from the model's own class distribution."""

    name = "sequence-classification"

    def sample_positions(self, batch: dict[str, torch.Tensor], config: FactorConfig) -> torch.Tensor:
        return batch["attention_mask"].bool()

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], config: FactorConfig,
                     batch_index: int) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), _sampled(logits, config, batch_index), reduction="sum")


class Seq2SeqTask(CausalLMTask):
    """An encoder-decoder (``...ForConditionalGeneration``): the encoder reads each block, the decoder rewrites it
    (its input is the block shifted right), and every position is a sample of both; labels are drawn from the
    decoder's own next-token distribution."""

    name = "seq2seq"

    def sample_positions(self, batch: dict[str, torch.Tensor], config: FactorConfig) -> torch.Tensor:
        return batch["attention_mask"].bool()

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], config: FactorConfig,
                     batch_index: int) -> torch.Tensor:
        ids = batch["input_ids"]
        decoder_ids = model._shift_right(ids)  # T5's own shift: the decoder start token, then the block
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], decoder_input_ids=decoder_ids,
                       use_cache=False).logits
        flat = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat.float(), _sampled(flat, config, batch_index), reduction="sum")


def tiny_models() -> dict[str, torch.nn.Module]:
    """A tiny BERT classifier and a tiny T5, built from configs (random weights, no download)."""
    import transformers

    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0))
    return {"bert": bert.eval(), "t5": t5.eval()}


TASKS = {"bert": (SequenceClassificationTask(), r".*layer\.\d\.(intermediate|output)\.dense"),
         "t5": (Seq2SeqTask(), r".*block\.\d\.layer\.\d\.DenseReluDense\.(wi|wo)")}


def main() -> None:
    ids = torch.randint(1, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    text = Dataset.from_dict({"input_ids": ids.tolist()})  # token ids: the task's packing takes them as they are
    for name, model in tiny_models().items():
        task, targets = TASKS[name]
        factors = fit_factors(model, text, FactorConfig(seq_len=12, batch_size=4, target_modules=targets),
                              task=task, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(Path(tmp) / "base")  # before the edit wraps the model's layers
            edited = build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.8, target_modules=targets))
            edited.save_pretrained(Path(tmp) / "edit")
            reloaded = PeftModel.from_pretrained(type(model).from_pretrained(Path(tmp) / "base"), Path(tmp) / "edit")
            x = dict(input_ids=ids[:2], **({"decoder_input_ids": ids[:2]} if name == "t5" else {}))
            with torch.no_grad():
                same = torch.equal(reloaded(**x).logits, edited(**x).logits)
        print(f"{name}: {len(factors.module_names)} modules fitted on {factors.num_tokens[factors.module_names[0]]} "
              f"tokens; the reloaded edit gives the same logits: {same}")


if __name__ == "__main__":
    main()
