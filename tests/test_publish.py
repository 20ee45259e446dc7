"""Model cards, publish() to a local folder, and push/pull through a local Hub-compatible server."""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import requests
import tomllib
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hub_fixtures import TOKEN  # noqa: E402
from huggingface_hub import HfApi, ModelCard  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError  # noqa: E402
from peft import AutoPeftModelForCausalLM, PeftModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from testing_utils import (  # noqa: E402
    VOCAB,
    random_eigen,  # noqa: E402
    tiny_llama,
)
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_curvedit  # noqa: E402,F401
from hf_curvedit import CurvatureEditConfig, build_curvature_edit  # noqa: E402
from hf_curvedit.evaluation import (  # noqa: E402
    CoherenceResult,
    EditReport,
    PerplexityComparison,
    PerplexityResult,
    RecitationComparison,
    RecitationMetrics,
)
from hf_curvedit.publish import (  # noqa: E402
    CardInputs,
    CardOptions,
    HubOptions,
    PublishError,
    load_template,
    plot_spectrum,
    plot_tradeoff,
    publish,
    push_folder,
    render_card,
)
from hf_curvedit.publish.card import module_rows  # noqa: E402
from hf_curvedit.tuner import curvature_edit_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def make_report(strict_base=0.985, strict_edited=0.05, ppl_base=6.01, ppl_edited=6.78, ndcg=0.91) -> EditReport:
    rec = lambda s, lev: RecitationMetrics(strict=s, loose=min(1.0, s + 0.02), avg_lev=lev, loose_threshold=0.75,  # noqa: E731
                                           distances=[0, 3], lengths=[8, 8])
    return EditReport(
        recitation={"quotes": RecitationComparison(rec(strict_base, 0.006), rec(strict_edited, 0.47))},
        perplexity={"wikitext": PerplexityComparison(PerplexityResult(ppl_base, 100.0, 55, 64, 64),
                                                     PerplexityResult(ppl_edited, 105.0, 55, 64, 64))},
        coherence={"wikitext": CoherenceResult(ndcg, 10, 55)},
    )


def edit(base, rho: float = 0.6, **config):
    eigen = random_eigen(base)
    cfg = CurvatureEditConfig(keep_mass=rho, task_type="CAUSAL_LM", target_modules=r".*mlp\.(gate|up)_proj",
                              factor_source={"dataset": "wikitext-103", "num_tokens": 20000,
                                             "factor_config": {"label_mode": "sampled", "seq_len": 64}}, **config)
    return build_curvature_edit(base, eigen, cfg), eigen


@pytest.fixture(scope="module")
def edited():
    model, eigen = edit(tiny_llama())
    return model, eigen


# ----------------------------------------------------------------------------------------------- templates and card
def test_templates_ship_inside_the_package():
    for kind in ("adapter", "merged"):
        text = load_template(kind)
        assert text.startswith("---\n{{ card_data }}\n---") and '{% include "_body.md.jinja" %}' in text
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p for p in (REPO_ROOT / "hf_curvedit" / "model_cards").iterdir()
               if any(fnmatch.fnmatch(f"model_cards/{p.name}", pat) for pat in package_data["hf_curvedit"])]
    assert {p.name for p in shipped} >= {"adapter.md.jinja", "merged.md.jinja", "_body.md.jinja"}
    # the top-level model_cards/ entries point at the packaged templates
    for name in ("adapter.md.jinja", "merged.md.jinja"):
        top = REPO_ROOT / "model_cards" / name
        assert top.resolve() == (REPO_ROOT / "hf_curvedit" / "model_cards" / name).resolve()


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_card_metadata_content_and_reparse(edited, kind):
    model, _ = edited
    report = make_report()
    cfg = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=sorted))
    card = render_card(CardInputs(kind=kind, repo_id="user/tiny-edit", edit_config=cfg,
                                  modules=module_rows(curvature_edit_report(model)), report=report,
                                  base_model="user/tiny-base", license="apache-2.0",
                                  factor_data={"dataset": "wikitext-103", "tokens": 20000, "label mode": "sampled"}))
    text = str(card)
    again = ModelCard(text)  # must re-parse
    data = again.data
    assert data.base_model == "user/tiny-base"
    assert data.base_model_relation == ("adapter" if kind == "adapter" else "finetune")
    assert data.library_name == ("peft" if kind == "adapter" else "transformers")
    assert data.pipeline_tag == "text-generation" and data.license == "apache-2.0"
    assert {"hf-curvedit", "curvature-edit", "memorization"} <= set(data.tags)
    assert ("peft" in data.tags) == (kind == "adapter")
    assert "model-index" in text
    by_metric = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert by_metric[("quotes", "strict_recitation")] == pytest.approx(5.0)
    assert by_metric[("quotes", "avg_levenshtein")] == pytest.approx(0.47)
    assert by_metric[("wikitext", "perplexity")] == pytest.approx(6.78)
    assert by_metric[("wikitext", "ndcg_10")] == pytest.approx(0.91)
    body = again.text
    assert "https://arxiv.org/abs/2510.24256" in body
    for layer in (0, 1):
        for proj in ("gate_proj", "up_proj"):
            assert f"| `model.layers.{layer}.mlp.{proj}` | 0.60 |" in body
    assert "down_proj`" not in body
    assert "dataset = `wikitext-103`" in body and "tokens = `20000`" in body and "label mode = `sampled`" in body
    # evaluation table: base against edited, rates in percent, perplexity change relative
    assert "| Strict (%) | quotes | 98.5% | 5.0% | -93.5 pt |" in body
    assert "| Perplexity | wikitext | 6.01 | 6.78 | +12.8% |" in body
    assert "| nDCG@10 | wikitext | 1.000 | 0.910 | -0.090 |" in body
    assert "TriviaQA" in body and "GSM8K" in body  # limitations
    assert 'from_pretrained("user/tiny-edit")' in body
    if kind == "adapter":
        assert "PeftModel.from_pretrained(base, \"user/tiny-edit\")" in body and "disable_adapter()" in body
    # the exact config, as YAML that parses back to it
    yaml_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(yaml_block) == cfg
    import transformers
    assert f"- transformers {transformers.__version__}" in body and "@article{" in body


def test_card_without_report_or_hub_base():
    card = render_card(CardInputs(kind="adapter", repo_id="user/x", edit_config={"keep_mass": 0.6},
                                  modules=[{"module": "m.up_proj", "keep_mass": 0.6}], base_model="/tmp/local/base"))
    data = ModelCard(str(card)).data
    # a local path is not valid Hub metadata: no base_model, no relation, no model-index
    assert data.base_model is None and getattr(data, "base_model_relation", None) is None and data.eval_results is None
    assert "No evaluation was attached" in str(card)
    # what a bare adapter_config.json knows: ρ and k, the rest shown as missing
    assert "| `m.up_proj` | 0.60 | – | – | – | – | – |" in str(card)


# ----------------------------------------------------------------------------------------------- plots
def test_spectrum_plot_marks_the_cut(tmp_path, edited):
    _, eigen = edited
    name = "model.layers.0.mlp.up_proj"
    path, st = plot_spectrum(eigen[name], 0.6, tmp_path / "s.png", module=name)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert 0 < st.k <= min(eigen[name].shape) and st.kept_mass_fraction >= 0.6
    # drawn from the staircase the adapter saved, the plot shows the same cut without selecting again
    model, _ = edited
    layer = model.get_submodule(f"base_model.model.{name}")
    saved = layer.curvedit_cutoffs["default"]
    _, from_saved = plot_spectrum(eigen[name], 0.6, tmp_path / "t.png", module=name, cutoffs=saved)
    assert torch.equal(from_saved.cutoffs, st.cutoffs) and torch.equal(from_saved.cutoffs, saved.cpu())
    assert (from_saved.r, from_saved.s, from_saved.kept_components) == (st.r, st.s, st.kept_components)


def test_tradeoff_plot_needs_several_rho(tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        plot_tradeoff({0.6: make_report()}, tmp_path / "t.png")
    sweep = {0.5: make_report(strict_edited=0.0, ppl_edited=7.2), 0.8: make_report(strict_edited=0.3, ppl_edited=6.2)}
    assert plot_tradeoff(sweep, tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)
    broken = {0.5: make_report(), 0.8: EditReport(recitation=make_report().recitation)}
    with pytest.raises(ValueError, match="evaluate every ρ on the same sets"):
        plot_tradeoff(broken, tmp_path / "u.png")


# ----------------------------------------------------------------------------------------------- local folder
def test_publish_dry_run_writes_a_complete_folder(tmp_path, edited):
    model, eigen = edited
    report = make_report()
    sweep = {0.5: make_report(strict_edited=0.0, ppl_edited=7.2), 0.6: report}
    out = tmp_path / "pub"
    res = publish(model, "user/tiny-edit", report, out_dir=out, eigen=eigen, sweep=sweep, dry_run=True,
                  card=CardOptions(base_model="user/tiny-base", license="mit"))
    assert res.dry_run and res.commit_url is None and res.folder == out
    files = set(res.files)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "curvedit_edit.json",
            "edit_report.json", "edit_sweep.json", "plots/recitation_vs_perplexity.png"} <= files
    spectra = sorted(f for f in files if f.startswith("plots/spectrum_"))
    assert len(spectra) == 4 and all((out / f).read_bytes().startswith(PNG_MAGIC) for f in spectra)
    assert EditReport.load(out / "edit_report.json") == report
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.base_model == "user/tiny-base"
    for f in spectra + ["plots/recitation_vs_perplexity.png"]:
        assert f"]({f})" in card.text  # every plot is embedded
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "user/tiny-base" and cfg["peft_type"] == "CURVEDIT"
    # the folder is a loadable adapter with the same outputs
    base = tiny_llama()
    loaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_card_reports_real_factor_provenance(tmp_path):
    from datasets import Dataset
    from testing_utils import random_token_rows

    from hf_curvedit import FactorConfig, eigendecompose, fit_factors

    base = tiny_llama()
    ds = Dataset.from_dict({"input_ids": random_token_rows(8, lo=16, hi=16, seed=3)})
    cfg = FactorConfig(label_mode="empirical", seq_len=16, batch_size=4, target_modules=r".*layers\.1\.mlp\.up_proj",
                       dataset="random-token-rows")
    factors = fit_factors(base, ds, cfg, progress=False)
    eigen = eigendecompose(factors)
    model = build_curvature_edit(base, eigen,
                                 CurvatureEditConfig(keep_mass=0.7, target_modules=["model.layers.1.mlp.up_proj"],
                                                     task_type="CAUSAL_LM"))
    res = publish(model, "user/real", out_dir=tmp_path / "p", eigen=eigen, dry_run=True,
                  card=CardOptions(base_model="user/tiny-base"))
    body = ModelCard.load(res.folder / "README.md").text
    assert "dataset = `random-token-rows`" in body and "label mode = `empirical`" in body
    (count,) = set(factors.num_tokens.values())
    assert f"tokens = `{count:,}`" in body and "sequence length = `16`" in body
    assert "| `model.layers.1.mlp.up_proj` | 0.70 |" in body
    assert res.files.count("plots/spectrum_model.layers.1.mlp.up_proj.png") == 1


def test_publish_refuses_foreign_non_empty_folder(tmp_path, edited):
    model, _ = edited
    (tmp_path / "mine.txt").write_text("do not upload or delete me")
    with pytest.raises(FileExistsError, match="not empty"):
        publish(model, "user/x", out_dir=tmp_path, dry_run=True)
    with pytest.raises(FileExistsError, match="refusing to delete"):
        publish(model, "user/x", out_dir=tmp_path, dry_run=True, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "do not upload or delete me"
    publish(model, "user/x", out_dir=tmp_path / "pub", dry_run=True)
    res = publish(model, "user/x", out_dir=tmp_path / "pub", dry_run=True, overwrite=True,
                  card=CardOptions(license="mit"))
    assert ModelCard.load(res.folder / "README.md").data.license == "mit"


def test_publish_a_plain_save_pretrained_folder(tmp_path, edited):
    model, _ = edited
    model.save_pretrained(tmp_path / "saved")
    res = publish(tmp_path / "saved", "user/x", out_dir=tmp_path / "p", dry_run=True,
                  card=CardOptions(base_model="user/tiny-base"))
    body = (res.folder / "README.md").read_text()
    k = {r.module: r.k for r in curvature_edit_report(model)}
    assert f"| `model.layers.0.mlp.up_proj` | 0.60 | – | – | {k['model.layers.0.mlp.up_proj']} |" in body
    assert json.loads((res.folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "user/tiny-base"


def test_publish_rejects_non_curvedit_input(tmp_path):
    with pytest.raises(TypeError, match="PeftModel or a folder"):
        publish(tiny_llama(), "user/x", out_dir=tmp_path / "o", dry_run=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a curvature edit folder"):
        publish(tmp_path / "empty", "user/x", out_dir=tmp_path / "o", dry_run=True)


def test_merged_dry_run_leaves_the_model_unmerged(tmp_path, edited):
    model, _ = edited
    with torch.no_grad():
        before = model(ids()).logits.clone()
        with model.disable_adapter():
            base_before = model(ids()).logits.clone()
    res = publish(model, "user/tiny-merged", out_dir=tmp_path / "m", merged=True, dry_run=True,
                  card=CardOptions(base_model="user/tiny-base"))
    assert "config.json" in res.files and "model.safetensors" in res.files and "adapter_config.json" not in res.files
    with safe_open(str(res.folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(tiny_llama().state_dict())  # plain transformers keys, no adapter buffers
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, before)
        with model.disable_adapter():
            assert torch.equal(model(ids()).logits, base_before)  # unmerge restored W exactly
    data = ModelCard.load(res.folder / "README.md").data
    assert data.library_name == "transformers" and data.base_model_relation == "finetune"


# ----------------------------------------------------------------------------------------------- through the Hub
def _push_base(hub, tmp_path) -> str:
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    (base_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny base\n")
    api = HfApi(token=TOKEN)
    api.create_repo("user/tiny-base", exist_ok=True)
    api.upload_folder(repo_id="user/tiny-base", folder_path=base_dir)
    return "user/tiny-base"


def test_push_adapter_and_merged_then_load_back(hub, tmp_path):
    base_id = _push_base(hub, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(base_id).eval()
    model, eigen = edit(base)
    assert model.peft_config["default"].base_model_name_or_path == base_id
    x = ids()
    with torch.no_grad():
        expected = model(x).logits.clone()
        with model.disable_adapter():
            base_out = model(x).logits.clone()

    res = publish(model, "user/tiny-edit", make_report(), out_dir=tmp_path / "adapter", eigen=eigen,
                  hub=HubOptions(token=TOKEN))
    assert res.commit_url.startswith(hub.url) and res.repo_url == f"{hub.url}/user/tiny-edit"
    stored = hub.files("user/tiny-edit")
    assert set(res.files) <= set(stored)
    assert all(stored[f] == (res.folder / f).read_bytes() for f in res.files)
    assert hub.is_lfs("user/tiny-edit", "adapter_model.safetensors")  # went through LFS batch + PUT
    card = ModelCard(stored["README.md"].decode())
    assert card.data.license == "apache-2.0"  # looked up from the base model's card on the Hub
    assert card.data.base_model == base_id and card.data.library_name == "peft"

    with torch.no_grad():
        fresh = AutoModelForCausalLM.from_pretrained(base_id).eval()
        peft_model = PeftModel.from_pretrained(fresh, "user/tiny-edit").eval()
        assert torch.equal(peft_model(x).logits, expected)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(x).logits, base_out)
        auto = AutoModelForCausalLM.from_pretrained("user/tiny-edit").eval()  # transformers loads base + adapter
        assert torch.equal(auto(x).logits, expected)
        auto_peft = AutoPeftModelForCausalLM.from_pretrained("user/tiny-edit").eval()
        assert torch.equal(auto_peft(x).logits, expected)

    res_m = publish(model, "user/tiny-merged", make_report(), out_dir=tmp_path / "merged", merged=True,
                    hub=HubOptions(token=TOKEN))
    stored = hub.files("user/tiny-merged")
    assert "model.safetensors" in stored and "adapter_config.json" not in stored
    assert ModelCard(stored["README.md"].decode()).data.base_model_relation == "finetune"
    with torch.no_grad():
        merged_local = AutoModelForCausalLM.from_pretrained(res_m.folder).eval()(x).logits
        merged_hub = AutoModelForCausalLM.from_pretrained("user/tiny-merged").eval()(x).logits
        assert torch.equal(merged_hub, merged_local)
        torch.testing.assert_close(merged_hub, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(model(x).logits, expected)  # publishing merged left the adapter model unmerged

    # an adapter folder can be published merged: its base is fetched from the Hub by base_model_name_or_path
    res_d = publish(res.folder, "user/tiny-merged-from-dir", out_dir=tmp_path / "merged2", merged=True,
                    hub=HubOptions(token=TOKEN))
    assert "model.safetensors" in res_d.files and "adapter_config.json" not in res_d.files
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained("user/tiny-merged-from-dir").eval()(x).logits
    assert torch.equal(again, merged_hub)


def test_republish_branch_pr_and_private(hub, tmp_path, edited):
    model, _ = edited
    first = publish(model, "user/re-edit", out_dir=tmp_path / "a", hub=HubOptions(token=TOKEN))
    # same repo again (create_repo answers 409 + url), new content: a second commit on main
    second = publish(model, "user/re-edit", make_report(), out_dir=tmp_path / "a", overwrite=True,
                     hub=HubOptions(token=TOKEN, commit_message="add evaluation"))
    assert second.commit_oid != first.commit_oid and "edit_report.json" in hub.files("user/re-edit")
    assert hub.state.repos["user/re-edit"].commits[second.commit_oid].message == "add evaluation"
    # a branch that does not exist yet is created, as push_to_hub does
    dev = publish(model, "user/re-edit", out_dir=tmp_path / "b", hub=HubOptions(revision="dev", token=TOKEN))
    assert hub.state.repos["user/re-edit"].branches["dev"] == dev.commit_oid
    # a pull request does not touch main
    main_before = hub.state.repos["user/re-edit"].branches["main"]
    pr = publish(model, "user/re-edit", make_report(0.9, 0.1), out_dir=tmp_path / "c",
                 hub=HubOptions(create_pr=True, token=TOKEN))
    assert pr.pr_url == f"{hub.url}/user/re-edit/discussions/1"
    assert hub.state.repos["user/re-edit"].branches["main"] == main_before
    assert "10.0%" in hub.files("user/re-edit", "refs/pr/1")["README.md"].decode()
    # the PR ref is readable through the client: tree listing and download (revision is URL-quoted)
    from huggingface_hub import hf_hub_download

    assert set(HfApi().list_repo_files("user/re-edit", revision="refs/pr/1")) == set(pr.files) | {".gitattributes"}
    readme = hf_hub_download("user/re-edit", "README.md", revision="refs/pr/1")
    assert Path(readme).read_bytes() == (pr.folder / "README.md").read_bytes()
    # private repos are created private and are invisible without a token
    publish(model, "user/secret-edit", out_dir=tmp_path / "d", hub=HubOptions(private=True, token=TOKEN))
    assert hub.state.repos["user/secret-edit"].private
    r = requests.get(f"{hub.url}/api/models/user/secret-edit")
    assert r.status_code == 401 and r.headers["X-Error-Code"] == "RepoNotFound"
    assert HfApi(token=TOKEN).model_info("user/secret-edit").private


def test_validate_yaml_endpoint(hub, tmp_path, edited):
    model, _ = edited
    res = publish(model, "user/x", make_report(), out_dir=tmp_path / "v", dry_run=True)
    ok = requests.post(f"{hub.url}/api/validate-yaml",
                       json={"content": (res.folder / "README.md").read_text(), "repoType": "model"})
    assert ok.status_code == 200 and ok.json()["errors"] == []
    bad = requests.post(f"{hub.url}/api/validate-yaml",
                        json={"content": "---\nkey: [unclosed\n---\n", "repoType": "model"})
    assert bad.status_code == 400


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_bad_token_gives_clear_error_and_keeps_folder(hub, tmp_path, edited):
    model, _ = edited
    with pytest.raises(PublishError) as info:
        publish(model, "user/fail-401", make_report(), out_dir=tmp_path / "f", hub=HubOptions(token="hf_not_a_token"))
    err = info.value
    assert err.status_code == 401 and err.stage == "create_repo"
    assert "authentication failed (401" in str(err) and "token" in str(err) and str(tmp_path / "f") in str(err)
    assert {"README.md", "adapter_model.safetensors", "edit_report.json"} <= set(_snapshot(err.folder))
    assert "user/fail-401" not in hub.state.repos
    # huggingface_hub's own error is the cause, its type kept, with our context appended to its message
    cause = err.__cause__
    assert isinstance(cause, HfHubHTTPError) and cause.response.status_code == 401
    assert "Invalid credentials" in str(cause) and "Invalid credentials" in str(err)  # the Hub's message, once
    assert ("[hf-curvedit] create_repo failed" in str(cause) and "push_folder(" in str(cause)
            and "HF_TOKEN" in str(cause))
    # writing to someone else's namespace is a 403 with its own message
    with pytest.raises(PublishError, match=r"permission denied \(403"):
        push_folder(err.folder, "other/x", HubOptions(token=TOKEN))


def test_server_error_keeps_folder_and_retry_succeeds(hub, tmp_path, edited):
    model, _ = edited
    hub.fail("POST", r"/api/models/user/fail-500/commit/", 500)
    with pytest.raises(PublishError) as info:
        publish(model, "user/fail-500", out_dir=tmp_path / "f", hub=HubOptions(token=TOKEN))
    err = info.value
    assert err.status_code == 500 and err.stage == "upload_folder" and "server error (500)" in str(err)
    before = _snapshot(err.folder)
    assert "README.md" in before
    hub.clear_failures()
    res = push_folder(err.folder, "user/fail-500", HubOptions(token=TOKEN))
    assert _snapshot(err.folder) == before
    assert hub.files("user/fail-500")["README.md"] == before["README.md"]
    assert res.commit_url is not None


def test_server_error_on_create_repo_names_the_step(hub, tmp_path, edited):
    model, _ = edited
    hub.fail("POST", r"^/api/repos/create$", 503, times=1)
    with pytest.raises(PublishError, match=r"server error \(503\) during create_repo") as info:
        publish(model, "user/fail-503", out_dir=tmp_path / "f", hub=HubOptions(token=TOKEN),
                card=CardOptions(license="mit"))
    assert info.value.status_code == 503 and "user/fail-503" not in hub.state.repos
    assert isinstance(info.value.__cause__, HfHubHTTPError) and "retry later" in str(info.value.__cause__)
    # the rule fired once only
    assert push_folder(info.value.folder, "user/fail-503", HubOptions(token=TOKEN)).commit_oid


def test_connection_refused_gives_clear_error(hub, tmp_path, edited):
    model, _ = edited
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(PublishError, match=f"could not connect to the Hub at {endpoint}") as info:
        publish(model, "user/nowhere", out_dir=tmp_path / "f", hub=HubOptions(token=TOKEN, endpoint=endpoint),
                card=CardOptions(license="mit"))
    assert info.value.stage == "create_repo" and (info.value.folder / "README.md").is_file()
    assert type(info.value.__cause__).__name__ == "ConnectError" and info.value.status_code is None


def test_offline_mode_is_named(tmp_path, edited, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, _ = edited
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish(model, "user/offline", out_dir=tmp_path / "f", hub=HubOptions(token=TOKEN),
                card=CardOptions(license="mit"))
    assert (tmp_path / "f" / "README.md").is_file()
    with pytest.raises(PublishError) as info:  # named before any request, with huggingface_hub's type as the cause
        push_folder(tmp_path / "f", "user/offline")
    assert isinstance(info.value.__cause__, OfflineModeIsEnabled) and info.value.stage == "create_repo"


def test_republish_a_published_folder(hub, tmp_path, edited):
    model, _ = edited
    first = publish(model, "user/from-dir", make_report(), out_dir=tmp_path / "a", dry_run=True,
                    card=CardOptions(base_model="user/b"))
    res = publish(first.folder, "user/from-dir", make_report(), out_dir=tmp_path / "b", hub=HubOptions(token=TOKEN),
                  card=CardOptions(license="mit"))
    stored = hub.files("user/from-dir")
    assert stored["adapter_model.safetensors"] == (first.folder / "adapter_model.safetensors").read_bytes()
    card = ModelCard(stored["README.md"].decode())
    assert card.data.base_model == "user/b" and "| `model.layers.1.mlp.up_proj` | 0.60 |" in card.text
    assert res.files == first.files
    # the earlier evaluation and spectra come along when no new ones are given
    again = publish(first.folder, "user/from-dir", out_dir=tmp_path / "c", dry_run=True)
    assert EditReport.load(again.folder / "edit_report.json") == make_report()
    assert "| Strict (%) | quotes | 98.5% | 5.0% |" in (again.folder / "README.md").read_text()


def test_hub_error_types_stay_catchable(hub, tmp_path, edited, monkeypatch):
    # a RepositoryNotFoundError (what hf_raise_for_status makes of an X-Error-Code: RepoNotFound answer) comes out as
    # the PublishError's cause, not as a status number
    from huggingface_hub.utils import hf_raise_for_status

    model, _ = edited
    httpx = sys.modules[HfHubHTTPError.__mro__[1].__module__.split(".")[0]]  # httpx (hub 1.x) or httpx2 (2.x)

    def missing(self, repo_id, **kwargs):
        request = httpx.Request("POST", f"{hub.url}/api/models/{repo_id}/branch/dev")
        hf_raise_for_status(httpx.Response(404, request=request, headers={"X-Error-Code": "RepoNotFound",
                                                                          "X-Request-Id": "req-123"}))

    monkeypatch.setattr(HfApi, "create_branch", missing)
    with pytest.raises(PublishError, match=r"not found \(404\) during create_branch") as info:
        publish(model, "user/gone", out_dir=tmp_path / "f", hub=HubOptions(token=TOKEN, revision="dev"))
    cause = info.value.__cause__
    assert isinstance(cause, RepositoryNotFoundError) and cause.request_id == "req-123"
    assert "req-123" in str(info.value) and "[hf-curvedit] create_branch failed" in str(cause)
    assert info.value.status_code == 404 and info.value.stage == "create_branch"


def test_hub_options_defaults_and_commit_message(hub, tmp_path, edited):
    assert HubOptions() == HubOptions(private=None, revision=None, create_pr=False, token=None, commit_message=None,
                                      commit_description=None, endpoint=None)
    assert CardOptions().tags == [] and CardOptions().factor_data is None
    model, _ = edited
    res = publish(model, "user/msg", out_dir=tmp_path / "a", hub=HubOptions(token=TOKEN, commit_description="body"))
    commit = hub.state.repos["user/msg"].commits[res.commit_oid]
    assert commit.message == "Upload curvature edit (adapter, ρ = 0.6)"  # derived from the edit
    again = push_folder(res.folder, "user/msg-again", HubOptions(token=TOKEN))
    assert hub.state.repos["user/msg-again"].commits[again.commit_oid].message == "Upload curvature edit"


def test_publish_is_stage_then_card_then_push(tmp_path, edited):
    from hf_curvedit.publish import stage_folder, write_card

    model, eigen = edited
    options = CardOptions(base_model="user/tiny-base", license="mit", tags=["extra-tag"],
                          factor_data={"tokens": "1,234"}, pipeline_tag="text-generation")
    staged = stage_folder(model, tmp_path / "s", make_report(), eigen=eigen, base_model=options.base_model)
    assert "hf-curvedit" not in (staged.folder / "README.md").read_text()  # only PEFT's stub: no card yet
    assert {"curvedit_edit.json", "edit_report.json", "adapter_model.safetensors"} <= set(
        str(p.relative_to(staged.folder)) for p in staged.folder.rglob("*"))
    card = write_card(staged, "user/tiny-edit", options, lookup_license=False)
    res = publish(model, "user/tiny-edit", make_report(), out_dir=tmp_path / "p", eigen=eigen, card=options,
                  dry_run=True)
    assert (staged.folder / "README.md").read_text() == (res.folder / "README.md").read_text() == str(card)
    assert "extra-tag" in card.data.tags and "tokens = `1,234`" in card.text
    assert "dataset = `wikitext-103`" in card.text  # the rest of the factor line still comes from factor_source
    # the spectrum plots draw the staircases the adapter saved: staging reads them back from its weights
    from hf_curvedit.publish.stage import _saved_cutoffs

    saved = _saved_cutoffs(staged.folder)
    layers = {r.module: r for r in curvature_edit_report(model, "default")}
    assert set(saved) == set(layers) and len(staged.spectrum_plots) == len(layers)
    for name, cut in saved.items():
        assert torch.equal(cut, model.get_submodule(f"base_model.model.{name}").curvedit_cutoffs["default"])


def test_factor_dataset_is_read_from_the_typed_field_and_legacy_adapters():
    from hf_curvedit import FactorConfig
    from hf_curvedit.publish.card import factor_data_from_source, factor_dataset

    typed = {"factor_config": FactorConfig(dataset="wikitext-103", seq_len=64).to_dict(), "num_tokens": {"a": 10}}
    assert factor_dataset(typed) == "wikitext-103"
    assert factor_data_from_source(typed) == {"dataset": "wikitext-103", "tokens": "10", "label mode": "sampled",
                                              "sequence length": 64}
    # adapters saved before FactorConfig.dataset existed kept it in factor_config.extra
    assert factor_dataset({"factor_config": {"extra": {"dataset": "old-data"}}}) == "old-data"
    # an explicit factor_source["dataset"] wins, and CardOptions.factor_data wins over everything
    assert factor_dataset({"dataset": "explicit", "factor_config": {"dataset": "typed"}}) == "explicit"
    assert factor_data_from_source(typed, {"dataset": "override"})["dataset"] == "override"
    assert factor_dataset({}) is None and "dataset" not in factor_data_from_source({})


def test_tuner_summary_owns_the_edit_description(tmp_path, edited):
    import ast

    from hf_curvedit.tuner import summary

    # a tuner module must not import hf_curvedit.publish (publish depends on the tuner, not the other way round)
    tree = ast.parse(Path(summary.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "publish" in m]
    model, _ = edited
    desc = summary.edit_summary(model)
    assert desc["kind"] == "adapter" and desc["config"]["peft_type"] == "CURVEDIT"
    assert [m["module"] for m in desc["modules"]] == [r.module for r in curvature_edit_report(model)]
    json.dumps(desc)  # JSON-ready
    with pytest.raises(ValueError, match="not a curvature edit"):
        summary.edit_summary(model, "missing")
    state = summary.merged_state_dict(model.get_base_model())
    assert set(state) == set(tiny_llama().state_dict())
    # rows from a saved config: ρ from keep_mass / keep_mass_pattern, or (older adapters) from edited_modules
    rows = summary.module_rows_from_config({"keep_mass": 0.6, "keep_mass_pattern": {"layers.1.mlp.up_proj": 0.8},
                                            "edited_modules": {"model.layers.1.mlp.up_proj": {"k": 3},
                                                               "model.layers.0.mlp.up_proj": {"k": 2},
                                                               "old.up_proj": {"k": 1, "keep_mass": 0.5}}})
    assert rows == [{"module": "model.layers.0.mlp.up_proj", "keep_mass": 0.6, "k": 2},
                    {"module": "model.layers.1.mlp.up_proj", "keep_mass": 0.8, "k": 3},
                    {"module": "old.up_proj", "keep_mass": 0.5, "k": 1}]


def test_merged_publish_of_an_adapter_folder_brings_its_evaluation(tmp_path, edited):
    # the folder is loaded with AutoPeftModelForCausalLM, then staged like a live model
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model, _ = edit(AutoModelForCausalLM.from_pretrained(base_dir))
    first = publish(model, "user/a", make_report(), out_dir=tmp_path / "a", dry_run=True)
    res = publish(first.folder, "user/m", out_dir=tmp_path / "m", merged=True, dry_run=True)
    assert "model.safetensors" in res.files and "adapter_config.json" not in res.files
    assert EditReport.load(res.folder / "edit_report.json") == make_report()
    assert json.loads((res.folder / "curvedit_edit.json").read_text())["kind"] == "merged"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_the_card_states_the_rho_of_each_layer_when_the_edit_allocates_it():
    from hf_curvedit.publish.card_rows import layer_rho_rows

    names = [f"model.layers.{i}.mlp.{leaf}" for i in (2, 3) for leaf in ("gate_proj", "up_proj", "down_proj")]
    uniform = [{"module": n, "keep_mass": 0.8} for n in names]
    assert layer_rho_rows(uniform) == [], "one ρ for all: the module table says it"
    per_layer = [{"module": n, "keep_mass": 0.85 if ".2." in n else 0.8} for n in names]
    assert layer_rho_rows(per_layer) == [{"layer": "2", "rho": "0.85"}, {"layer": "3", "rho": "0.8"}]
    per_projection = [{"module": n, "keep_mass": 0.9 if n.endswith("down_proj") else 0.8} for n in names]
    assert layer_rho_rows(per_projection) == [{"layer": "2", "rho": "gate/up 0.8, down 0.9"},
                                              {"layer": "3", "rho": "gate/up 0.8, down 0.9"}]
    card = lambda modules: str(render_card(CardInputs(kind="adapter", repo_id="user/x",  # noqa: E731
                                                      edit_config={"keep_mass": 0.8}, modules=modules)))
    assert "- **ρ per layer:** layer 2: 0.85; layer 3: 0.8 (each module" in card(per_layer)
    assert "| `model.layers.2.mlp.down_proj` | 0.85 |" in card(per_layer)
    assert "ρ per layer" not in card(uniform)
