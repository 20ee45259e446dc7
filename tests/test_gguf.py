"""GGUF in and out, on a tiny GGUF written in the test (tests/gguf_fixtures.py): a model read from it is fitted and
edited; the adapter records the file's SHA-256 and reloads bit for bit onto a base read from the same file, through
hf-curvedit's loader and transformers' own; the merged model saves as safetensors; the edit written back as GGUF keeps
the source's metadata and tensors, and transformers reads it back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from gguf_fixtures import tiny_gguf_model, write_tiny_gguf
from peft import PeftModel
from testing_utils import assert_reloads_the_same, random_token_rows
from transformers import AutoModelForCausalLM

from hf_curvedit import CurvatureEditConfig, FactorConfig, build_curvature_edit, fit_factors
from hf_curvedit.cli import main
from hf_curvedit.default import byte_tokenizer
from hf_curvedit.errors import InputError
from hf_curvedit.gguf import gguf_source, load_gguf_model
from hf_curvedit.publish import export_gguf
from hf_curvedit.tuner.stores import WrongBaseModelError

gguf = pytest.importorskip("gguf")
TARGETS = r"model\.layers\.\d\.mlp\.(gate|up|down)_proj"
X = torch.tensor([random_token_rows(1, lo=12, hi=12, seed=5)[0], random_token_rows(1, lo=12, hi=12, seed=6)[0]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with a tiny Llama as an F32 GGUF and as a Q8_0 GGUF (each 2D weight quantized)."""
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "tiny.gguf")
    write_tiny_gguf(root / "tiny-q8.gguf", qtype="Q8_0")
    return root


def _edit(model):
    data = Dataset.from_dict({"input_ids": random_token_rows(16, lo=10, hi=20, seed=2)})
    factors = fit_factors(model, data, FactorConfig(seq_len=16, batch_size=4, target_modules=TARGETS), progress=False)
    return build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=0.7, target_modules=TARGETS))


def test_a_gguf_model_is_fitted_edited_saved_and_reloaded_bit_for_bit(folder, tmp_path):
    model, tok = load_gguf_model(folder, "tiny.gguf")
    assert torch.equal(logits(model), logits(tiny_gguf_model())), "the F32 file holds the model exactly"
    text = "def fibonacci(n): return n"
    # add_special_tokens=False: transformers 5.0 prepends a BOS to a llama-architecture GGUF tokenizer, 5.23 does not
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == byte_tokenizer()(text, add_special_tokens=False)["input_ids"], "the tokenizer is read from the file"
    edited = _edit(model)
    source = gguf_source(folder / "tiny.gguf")
    assert edited.peft_config["default"].base_gguf == source and len(source["sha256"]) == 64
    out = logits(edited)
    edited.save_pretrained(tmp_path / "edit")
    assert json.loads((tmp_path / "edit" / "adapter_config.json").read_text())["base_gguf"] == source

    # onto a base read from the same file: hf-curvedit's loader, transformers' GGUF loader
    ours = PeftModel.from_pretrained(load_gguf_model(folder, "tiny.gguf")[0], tmp_path / "edit")
    stock = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf")
    theirs = PeftModel.from_pretrained(stock, tmp_path / "edit")
    assert torch.equal(logits(ours), out) and torch.equal(logits(theirs), out)
    plain = load_gguf_model(folder, "tiny.gguf")[0]
    plain.load_adapter(str(tmp_path / "edit"))
    assert torch.equal(logits(plain), out), "transformers' load_adapter"
    # the merged model is an ordinary checkpoint
    merged = ours.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert sorted(p.suffix for p in (tmp_path / "merged").glob("model*")) == [".safetensors"]
    assert_reloads_the_same(merged, AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), logits, "merged")
    torch.testing.assert_close(logits(merged), out, rtol=1e-4, atol=1e-5)

    # a base read from another GGUF file is refused by name
    write_tiny_gguf(tmp_path / "other.gguf", tiny_gguf_model(seed=1))
    with pytest.raises(WrongBaseModelError, match=r"built on the GGUF file tiny.gguf .* read from other.gguf"):
        PeftModel.from_pretrained(load_gguf_model(tmp_path, "other.gguf")[0], tmp_path / "edit")


def test_the_cli_reads_gguf_with_gguf_file(folder, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["fit", "--model", str(folder), "--gguf-file", "tiny.gguf", "--data", str(text), "--output-dir",
                 str(tmp_path / "f"), "--seq-len", "32", "--batch-size", "4", "--max-tokens", "256",
                 "--target-modules", TARGETS]) == 0
    assert main(["edit", "--model", str(folder), "--gguf-file", "tiny.gguf", "--factors", str(tmp_path / "f"),
                 "--keep-mass", "0.8", "--target-modules", TARGETS, "--output-dir", str(tmp_path / "e")]) == 0
    config = json.loads((tmp_path / "e" / "rho0.8" / "adapter_config.json").read_text())
    assert config["base_gguf"] == gguf_source(folder / "tiny.gguf")
    assert main(["plan", "--gguf-file", str(folder / "tiny.gguf")]) == 0, "a path needs no --model"
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out
    missing = ["fit", "--model", str(folder), "--gguf-file", "missing.gguf", "--output-dir", str(tmp_path / "x")]
    assert main(missing) == 2
    assert "GGUF file 'missing.gguf' not found in" in capsys.readouterr().err


@pytest.mark.parametrize("qtype", [None, "Q4_0", "F32"])
def test_an_edit_written_back_as_gguf_is_read_by_transformers(folder, tmp_path, qtype):
    """From the Q8_0 file: the edited tensors replaced (in the source's type, or the one named), every other tensor
    and every metadata field copied; transformers reads the file, and its logits are the merged model's within the
    quantization error."""
    model, _ = load_gguf_model(folder, "tiny-q8.gguf")
    edited = _edit(model)
    with torch.no_grad():
        edited.merge_adapter()
        merged = logits(edited)
        edited.unmerge_adapter()
    out = export_gguf(edited, folder / "tiny-q8.gguf", tmp_path / "edit.gguf", qtype=qtype)
    source, written = gguf.GGUFReader(str(folder / "tiny-q8.gguf")), gguf.GGUFReader(str(out))
    replaced = set(json.loads(str(bytes(written.fields["hf_curvedit.edited_tensors"].parts[-1]), "utf-8")))
    assert replaced == {f"blk.{i}.ffn_{k}.weight" for i in (0, 1) for k in ("gate", "up", "down")}
    for a, b in zip(source.tensors, written.tensors):
        assert a.name == b.name and (a.name in replaced or (a.tensor_type == b.tensor_type
                                                            and bytes(a.data) == bytes(b.data))), a.name
        if a.name in replaced:
            assert b.tensor_type.name == (qtype or "Q8_0") and bytes(a.data) != bytes(b.data)
    assert set(source.fields) - {"GGUF.kv_count"} <= set(written.fields)
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="edit.gguf")
    error = float((logits(reread) - merged).norm() / merged.norm())
    assert error < {"F32": 1e-6, None: 2e-2, "Q4_0": 0.2}[qtype], error
    if qtype == "F32":  # no quantization of the edit: the merged model's own weights
        for name in ("gate_proj", "up_proj", "down_proj"):
            with torch.no_grad():
                edited.merge_adapter()
                want = edited.get_base_model().model.layers[0].mlp.get_submodule(name).weight.clone()
                edited.unmerge_adapter()
            assert torch.equal(reread.model.layers[0].mlp.get_submodule(name).weight, want)


def test_export_refuses_what_it_cannot_write(folder, tmp_path):
    model, _ = load_gguf_model(folder, "tiny.gguf")
    edited = _edit(model)
    with pytest.raises(InputError, match="quantizes F32, F16, Q8_0, Q4_0, Q4_1"):
        export_gguf(edited, folder / "tiny.gguf", tmp_path / "x.gguf", qtype="Q4_K")
    plain = load_gguf_model(folder, "tiny.gguf")[0]
    with pytest.raises(InputError, match="needs the edited modules' names"):
        export_gguf(plain, folder / "tiny.gguf", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_publish_carries_the_edit_as_gguf_and_the_card_says_so(folder, tmp_path):
    from hf_curvedit.publish import publish

    edited = _edit(load_gguf_model(folder, "tiny-q8.gguf")[0])
    edited.save_pretrained(tmp_path / "edit")
    result = publish(tmp_path / "edit", "user/tiny-curvedit", out_dir=tmp_path / "pub", dry_run=True,
                     gguf_source=folder / "tiny-q8.gguf")
    assert (tmp_path / "pub" / "tiny-curvedit.Q8_0.gguf").is_file()
    assert "tiny-curvedit.Q8_0.gguf" in [Path(f).name for f in result.files]
    card = (tmp_path / "pub" / "README.md").read_text()
    sha = gguf_source(folder / "tiny-q8.gguf")["sha256"]
    assert "### GGUF" in card and "with the 6\nedited tensors replaced and quantized as Q8_0" in card
    assert f"**Base read from GGUF:** `tiny-q8.gguf` (sha256 `{sha[:16]}…`)" in card
    # the folder is an adapter repo (transformers would load its base): the GGUF file alone is the whole model
    (tmp_path / "alone").mkdir()
    (tmp_path / "pub" / "tiny-curvedit.Q8_0.gguf").rename(tmp_path / "alone" / "model.gguf")
    reread = AutoModelForCausalLM.from_pretrained(tmp_path / "alone", gguf_file="model.gguf")
    with torch.no_grad():
        edited.merge_adapter()
        torch.testing.assert_close(logits(reread), logits(edited), rtol=0.05, atol=0.05)


def test_without_the_gguf_package_the_error_names_the_extra(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(InputError, match=r"pip install 'hf-curvedit\[gguf\]'"):
        load_gguf_model(folder, "tiny.gguf")
    assert main(["fit", "--model", str(folder), "--gguf-file", "tiny.gguf", "--output-dir", str(tmp_path / "f")]) == 2
    assert "pip install 'hf-curvedit[gguf]'" in capsys.readouterr().err


def test_every_weight_of_a_changed_model_written_into_the_source_layout_reads_back_as_that_model(folder, tmp_path):
    """A fine-tuned model (every weight changed, attention q/k included, which llama.cpp stores permuted) written into
    a copy of the file it was read from (modules="all", float32) is that model again when transformers reads it."""
    model, _ = load_gguf_model(folder, "tiny.gguf")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    export_gguf(model, folder / "tiny.gguf", tmp_path / "tuned.gguf", modules="all", qtype="F32")
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tuned.gguf")
    assert torch.equal(logits(reread), logits(model))
