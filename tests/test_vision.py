"""Image classifiers: K-FAC factors against brute force (ViT, DeiT, DINOv2, Swin), the adapter on a ViT,
noisy-label evaluation in the EditReport and the card."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage
from testing_utils import record_module_io, slow, tiny_llama

from hf_curvedit import (
    CurvatureEditConfig,
    EditReport,
    FactorConfig,
    ImageClassificationSet,
    build_curvature_edit,
    evaluate_edit,
    fit_factors,
    load_factors,
)
from hf_curvedit.curvature.tasks import ImageClassificationTask, batch_generator, sample_labels
from hf_curvedit.evaluation import classification_scores
from hf_curvedit.publish.card import eval_results
from hf_curvedit.targets import resolve_target_modules

NUM_LABELS = 5
VIT_KW = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, num_labels=NUM_LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_vit(seed: int = 0) -> T.ViTForImageClassification:
    torch.manual_seed(seed)
    return T.ViTForImageClassification(T.ViTConfig(**VIT_KW)).eval()


def tiny_deit(seed: int = 0) -> T.DeiTForImageClassification:
    torch.manual_seed(seed)
    return T.DeiTForImageClassification(T.DeiTConfig(**VIT_KW)).eval()


def tiny_dinov2(seed: int = 0) -> T.Dinov2ForImageClassification:
    torch.manual_seed(seed)
    return T.Dinov2ForImageClassification(T.Dinov2Config(**VIT_KW)).eval()


def tiny_swin(seed: int = 0) -> T.SwinForImageClassification:
    torch.manual_seed(seed)
    return T.SwinForImageClassification(T.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[1, 1],
                                                     num_heads=[2, 2], window_size=2, num_labels=NUM_LABELS)).eval()


def tiny_beit(seed: int = 0) -> T.BeitForImageClassification:
    torch.manual_seed(seed)
    return T.BeitForImageClassification(T.BeitConfig(**VIT_KW)).eval()


def processor() -> T.ViTImageProcessor:
    return T.ViTImageProcessor(size={"height": 16, "width": 16})


def image_dataset(n: int = 10, seed: int = 0) -> Dataset:
    """Grayscale 8×8 images (like sklearn's digits) with class labels, as a `datasets` image dataset."""
    rng = np.random.default_rng(seed)
    images = [PILImage.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L") for _ in range(n)]
    labels = rng.integers(0, NUM_LABELS, n).tolist()
    feats = Features({"image": Image(), "label": ClassLabel(num_classes=NUM_LABELS)})
    return Dataset.from_dict({"image": images, "label": labels}, features=feats)


def brute_force_image_factors(model, pixel_values, labels, names, positions):
    """Per-image losses, per-position outer products from autograd, in float64."""
    with record_module_io(model, names) as (ins, outs):
        logits = model(pixel_values=pixel_values).logits
    loss = sum(F.cross_entropy(logits[i:i + 1], labels[i:i + 1], reduction="sum") for i in range(len(labels)))
    grads = torch.autograd.grad(loss, [outs[n] for n in names])
    A, G, count = {}, {}, {}
    for n, g in zip(names, grads):
        a, gg = ins[n].detach().double(), g.double()
        B, L = a.shape[:2]
        pos = [(b, 0) for b in range(B)] if positions == "cls" else [(b, t) for b in range(B) for t in range(L)]
        A[n] = sum(torch.outer(a[b, t], a[b, t]) for b, t in pos) / len(pos)
        G[n] = sum(torch.outer(gg[b, t], gg[b, t]) for b, t in pos) / len(pos)
        count[n] = len(pos)
    return A, G, count


@pytest.mark.parametrize("make_model,positions", [
    (tiny_vit, "cls"), (tiny_vit, "all"), (tiny_deit, "cls"), (tiny_dinov2, "cls"), (tiny_dinov2, "all"),
    (tiny_swin, "all"), (tiny_beit, "all"),
], ids=["vit-cls", "vit-all", "deit-cls", "dinov2-cls", "dinov2-all", "swin-all", "beit-all"])
@pytest.mark.parametrize("label_mode", ["empirical", "sampled"])
def test_image_factors_match_brute_force(make_model, positions, label_mode):
    model = make_model()
    ds = image_dataset(10)
    proc = processor()
    cfg = FactorConfig(label_mode=label_mode, token_positions=positions, batch_size=10, accumulate_dtype="float64")
    factors = fit_factors(model, ds, cfg, image_processor=proc, progress=False)

    names = resolve_target_modules(model)
    assert factors.module_names == names and len(names) >= 2
    pixel_values = proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
    if label_mode == "empirical":
        labels = torch.tensor(ds["label"])
    else:
        with torch.no_grad():
            logits = model(pixel_values=pixel_values).logits
        labels = sample_labels(logits, batch_generator(0, 0, logits.device), cfg.sample_chunk_size)
    A, G, count = brute_force_image_factors(model, pixel_values, labels, names, positions)
    for n in names:
        assert factors.num_tokens[n] == count[n]
        # The model runs in fp32, so compare at fp32 precision relative to the factor's size.
        for got, want in ((factors.A[n], A[n]), (factors.G[n], G[n])):
            assert float((got.double() - want).norm() / want.norm()) < 1e-5
        assert factors.G[n].diagonal().sum() > 0


def test_cls_positions_see_one_sample_per_image_and_all_positions_see_every_token():
    model = tiny_vit()
    ds = image_dataset(7)
    cls = fit_factors(model, ds, FactorConfig(batch_size=3), image_processor=processor(), progress=False)
    allpos = fit_factors(model, ds, FactorConfig(batch_size=3, token_positions="all"), image_processor=processor(),
                         progress=False)
    tokens = (16 // 4) ** 2 + 1
    assert set(cls.num_tokens.values()) == {7}
    assert set(allpos.num_tokens.values()) == {7 * tokens}
    n = cls.module_names[0]
    assert not torch.allclose(cls.A[n], allpos.A[n])


@pytest.mark.parametrize("make_model,positions", [(tiny_vit, "cls"), (tiny_swin, "all"), (tiny_beit, "all")],
                         ids=["vit", "swin", "beit"])
def test_frozen_weights_and_a_classifier_head_target_give_the_same_factors(make_model, positions):
    """Frozen models (Swin/BEiT embeddings return tuples) still differentiate; a 2-D target (the head) works in any
    mode."""
    ds = image_dataset(6)
    targets = resolve_target_modules(make_model()) + ["classifier"]
    cfg = FactorConfig(batch_size=3, token_positions=positions, target_modules=targets)
    ref = fit_factors(make_model(), ds, cfg, image_processor=processor(), progress=False)
    frozen = make_model().requires_grad_(False)
    got = fit_factors(frozen, ds, cfg, image_processor=processor(), progress=False)
    assert ref.num_tokens["classifier"] == 6
    for n in ref.module_names:
        torch.testing.assert_close(got.A[n], ref.A[n])
        torch.testing.assert_close(got.G[n], ref.G[n])
    assert not any(p.grad is not None for p in frozen.parameters())


def test_streaming_image_data_gives_the_same_factors():
    ds = image_dataset(7)
    cfg = FactorConfig(batch_size=3, label_mode="empirical")
    ref = fit_factors(tiny_vit(), ds, cfg, image_processor=processor(), progress=False)
    got = fit_factors(tiny_vit(), ds.to_iterable_dataset(), cfg, image_processor=processor(), progress=False)
    for n in ref.module_names:
        assert got.num_tokens[n] == 7
        torch.testing.assert_close(got.A[n], ref.A[n])
        torch.testing.assert_close(got.G[n], ref.G[n])


def test_pixel_values_column_needs_no_processor_and_gives_the_same_factors():
    model = tiny_vit()
    ds = image_dataset(6)
    proc = processor()
    pv = proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
    pre = Dataset.from_dict({"pixel_values": pv.numpy(), "label": ds["label"]})
    cfg = FactorConfig(batch_size=4, label_mode="empirical")
    a = fit_factors(model, ds, cfg, image_processor=proc, progress=False)
    b = fit_factors(model, pre, cfg, progress=False)
    for n in a.module_names:
        torch.testing.assert_close(a.A[n], b.A[n])
        torch.testing.assert_close(a.G[n], b.G[n])


def test_image_factors_resume_after_a_crash(tmp_path, monkeypatch):
    model = tiny_vit()
    ds = image_dataset(12)
    cfg = FactorConfig(batch_size=2, checkpoint_every=1, max_examples=10)
    full = fit_factors(model, ds, cfg, image_processor=processor(), progress=False)
    real = ImageClassificationTask.compute_loss
    seen: list[int] = []

    def crashing(self, model, batch, cfg, b):
        seen.append(b)
        if b == 3 and len(seen) < 5:
            raise KeyboardInterrupt
        return real(self, model, batch, cfg, b)

    monkeypatch.setattr(ImageClassificationTask, "compute_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        fit_factors(model, ds, cfg, tmp_path, image_processor=processor(), progress=False)
    resumed = fit_factors(model, ds, cfg, tmp_path, image_processor=processor(), progress=False)
    assert seen == [0, 1, 2, 3, 3, 4]
    for n in full.module_names:
        assert resumed.num_tokens[n] == 10
        torch.testing.assert_close(resumed.A[n], full.A[n])
        torch.testing.assert_close(resumed.G[n], full.G[n])


def test_image_factor_errors_name_the_fix():
    ds = image_dataset(4)
    with pytest.raises(ValueError, match="no class token.*token_positions='all'"):
        fit_factors(tiny_swin(), ds, FactorConfig(token_positions="cls"), image_processor=processor(), progress=False)
    # BEiT's head averages the patch tokens by default, so nothing would reach the last block at the class token.
    with pytest.raises(ValueError, match="use_mean_pooling=True.*token_positions='all'"):
        fit_factors(tiny_beit(), ds, FactorConfig(), image_processor=processor(), progress=False)
    regression = T.ViTForImageClassification(T.ViTConfig(**{**VIT_KW, "num_labels": 1}))
    with pytest.raises(ValueError, match="single-label classifier"):
        fit_factors(regression, ds, FactorConfig(), image_processor=processor(), progress=False)
    with pytest.raises(ValueError, match="image_processor="):
        fit_factors(tiny_vit(), ds, FactorConfig(), progress=False)
    with pytest.raises(ValueError, match="no 'picture'.*image_column"):
        fit_factors(tiny_vit(), ds, FactorConfig(image_column="picture"), image_processor=processor(), progress=False)
    with pytest.raises(ValueError, match="'target'.*label_mode='sampled'"):
        fit_factors(tiny_vit(), ds, FactorConfig(label_mode="empirical", label_column="target"),
                    image_processor=processor(), progress=False)
    with pytest.raises(ValueError, match="max_examples"):
        fit_factors(tiny_vit(), ds, FactorConfig(max_tokens=1000), image_processor=processor(), progress=False)
    bad = ds.cast_column("label", Value("int64")).map(lambda r: {"label": r["label"] + NUM_LABELS})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        fit_factors(tiny_vit(), bad, FactorConfig(label_mode="empirical"), image_processor=processor(), progress=False)
    with pytest.raises(ValueError, match="token_positions='cls' is for image classifiers"):
        fit_factors(tiny_llama(), Dataset.from_dict({"input_ids": [[1, 2, 3, 4]]}),
                    FactorConfig(token_positions="cls", seq_len=4), progress=False)
    with pytest.raises(ValueError, match="token_positions="):
        FactorConfig(token_positions="patch")


def vit_edit(tmp_path=None, keep_mass=0.7):
    model = tiny_vit()
    factors = fit_factors(model, image_dataset(16), FactorConfig(batch_size=8), image_processor=processor(),
                          progress=False)
    return model, build_curvature_edit(model, factors, CurvatureEditConfig(keep_mass=keep_mass))


def test_vit_adapter_uses_vision_defaults_toggles_merges_and_reloads(tmp_path):
    from peft import PeftModel

    _, peft_model = vit_edit()
    names = sorted(n for n, m in peft_model.named_modules() if hasattr(m, "curvedit_B"))
    # the MLP projections of every block, under transformers 5's names (mlp.fc1/fc2) or the BERT-style ones
    mlp_leaves = ("mlp.fc1", "mlp.fc2", "intermediate.dense", "output.dense")
    assert len(names) == 2 * peft_model.config.num_hidden_layers
    assert all(n.endswith(mlp_leaves) and "attention" not in n for n in names)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        edited = peft_model(pixel_values=x).logits
        with peft_model.disable_adapter():
            base = peft_model(pixel_values=x).logits
        ref = tiny_vit()(pixel_values=x).logits
    assert torch.equal(base, ref)
    assert not torch.allclose(edited, base)

    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, edited, rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    plain = T.AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=x).logits, edited, rtol=1e-5, atol=1e-5)


def test_classification_scores_by_hand():
    m = classification_scores([1, 2, 3, 4], [1, 0, 3, 0])
    assert m.accuracy == 0.5 and m.true_label_accuracy is None and m.n == 4
    # images 1 and 3 have noisy labels (0, true 2; 0, true 4): image 1 is predicted as its noisy label, image 3 as
    # its true label.
    noisy = classification_scores([1, 0, 3, 4], [1, 0, 3, 0], [1, 2, 3, 4])
    assert noisy.n == 2 and noisy.accuracy == 0.5 and noisy.true_label_accuracy == 0.5
    assert noisy.memorized_label_rate == 0.5
    with pytest.raises(ValueError, match="no noisy label"):
        classification_scores([1], [1], [1])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        classification_scores([1, 2, 3], [1, 2])


def test_evaluate_edit_reports_memorized_labels_and_accuracy_and_the_card_shows_them(tmp_path):
    _, peft_model = vit_edit(keep_mass=0.5)
    ds = image_dataset(12, seed=1)
    with torch.no_grad():
        base_pred = tiny_vit()(pixel_values=processor()(images=[i.convert("RGB") for i in ds["image"]],
                                                       return_tensors="pt")["pixel_values"]).logits.argmax(-1)
    # "noisy" labels = what the base predicts, true labels = anything else: the base has memorized every one.
    true = [(int(p) + 1) % NUM_LABELS for p in base_pred]
    noisy = ds.cast_column("label", Value("int64")).map(
        lambda r, i: {"label": int(base_pred[i]), "true_label": true[i]}, with_indices=True)
    sets = {
        "train_noisy": ImageClassificationSet.from_dataset(noisy, processor(), true_label_column="true_label"),
        "validation": ImageClassificationSet.from_dataset(ds, processor()),
    }
    report = evaluate_edit(peft_model, sets, show_progress=False)
    c = report.classification["train_noisy"]
    assert c.base.accuracy == 1.0 and c.base.true_label_accuracy == 0.0 and c.base.n == 12
    assert 0.0 <= c.edited.accuracy < 1.0
    rows = {(r.metric, r.set): r for r in report.to_table_rows()}
    assert rows[("Memorized-label rate", "train_noisy")].base == 1.0
    assert ("True-label accuracy", "train_noisy") in rows and ("Accuracy", "validation") in rows
    assert EditReport.from_json(report.to_json()) == report
    results = {(r.metric_type, r.dataset_name): r for r in eval_results(report, "image-classification")}
    assert results[("memorized_label_rate", "train_noisy")].metric_value == pytest.approx(100 * c.edited.accuracy)
    assert results[("accuracy", "validation")].task_type == "image-classification"


def test_image_set_errors():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ImageClassificationSet(torch.zeros(3, 3, 16, 16), [0, 1])
    with pytest.raises(ValueError, match=r"\(N, channels, height, width\)"):
        ImageClassificationSet(torch.zeros(3, 16, 16), [0, 1, 2])
    with pytest.raises(ValueError, match="drop true_labels"):
        ImageClassificationSet(torch.zeros(2, 3, 16, 16), [0, 1], [0, 1])
    with pytest.raises(TypeError, match="ImageClassificationSet.from_dataset"):
        evaluate_edit(vit_edit()[1], {"val": image_dataset(2)}, show_progress=False)
    with pytest.raises(ValueError, match="no true-label column 'truth'"):
        ImageClassificationSet.from_dataset(image_dataset(2), processor(), true_label_column="truth")


def test_publish_writes_an_image_classification_card_with_the_noisy_label_table(tmp_path):
    from huggingface_hub import ModelCard

    from hf_curvedit.publish import publish

    _, peft_model = vit_edit(keep_mass=0.5)
    ds = image_dataset(8, seed=2)
    true = [(label + 1) % NUM_LABELS for label in ds["label"]]
    noisy = ImageClassificationSet.from_dataset(ds.add_column("true_label", true), processor(),
                                                true_label_column="true_label")
    report = evaluate_edit(peft_model, {"train_noisy": noisy}, show_progress=False)
    res = publish(peft_model, "user/vit-edit", report, out_dir=tmp_path / "card", dry_run=True)
    card = ModelCard.load(res.folder / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert "Memorized-label rate (%)" in card.text and "True-label accuracy (%)" in card.text
    metrics = {r["type"] for r in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert {"memorized_label_rate", "true_label_accuracy"} <= metrics


@slow
def test_vision_example_runs_end_to_end_in_miniature(tmp_path):
    """examples/vision_noisy_labels.py with 2 epochs: every step runs and writes what it promises."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parents[1] / "examples" / "vision_noisy_labels.py"
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), "--output-dir", str(out), "--epochs", "2",
                           "--shift-radius", "0", "--keep-mass", "0.9", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Memorized-label rate" in proc.stdout and "memorized-label rate falls" in proc.stdout
    report = EditReport.load(out / "edit_report.json")
    assert set(report.classification) == {"train (noisy labels)", "train (clean labels)", "validation", "test"}
    assert json.loads((out / "edit" / "adapter_config.json").read_text())["peft_type"] == "CURVEDIT"
    assert (out / "card" / "README.md").is_file() and (out / "base" / "preprocessor_config.json").is_file()


def test_cli_fits_and_edits_an_image_classifier_from_a_folder_of_images(tmp_path, capsys):
    from hf_curvedit.cli import main

    model_dir = tmp_path / "vit"
    tiny_vit().save_pretrained(model_dir)
    processor().save_pretrained(model_dir)
    ds = image_dataset(9)
    for i, (img, label) in enumerate(zip(ds["image"], ds["label"])):
        (tmp_path / "images" / f"class{label}").mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "images" / f"class{label}" / f"{i}.png")

    rc = main(["fit", "--model", str(model_dir), "--data", str(tmp_path / "images"), "--output-dir",
               str(tmp_path / "factors"), "--batch-size", "4", "--max-examples", "8"])
    assert rc == 0
    factors = load_factors(tmp_path / "factors")
    assert set(factors.num_tokens.values()) == {8}  # class token of 8 images
    assert factors.config.token_positions is None and factors.config.max_examples == 8
    direct = fit_factors(tiny_vit(), tmp_path / "images", FactorConfig(batch_size=4, max_examples=8),
                         image_processor=processor(), progress=False)
    for n in factors.module_names:
        torch.testing.assert_close(factors.A[n], direct.A[n])
        torch.testing.assert_close(factors.G[n], direct.G[n])

    rc = main(["edit", "--model", str(model_dir), "--factors", str(tmp_path / "factors"), "--keep-mass", "0.7",
               "--output-dir", str(tmp_path / "edits")])
    assert rc == 0 and (tmp_path / "edits" / "rho0.7" / "adapter_model.safetensors").is_file()

    capsys.readouterr()
    assert main(["fit", "--model", str(model_dir), "--output-dir", str(tmp_path / "f2")]) == 2
    assert "needs --data" in capsys.readouterr().err
