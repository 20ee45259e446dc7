"""The demo Space that `publish(..., space=True)` / `hf-curvedit publish --space` writes and pushes."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from hub_fixtures import TOKEN
from huggingface_hub import SpaceCard
from testing_utils import random_eigen, tiny_llama

import hf_curvedit.demo as demo_module
from hf_curvedit import CurvatureEditConfig, build_curvature_edit
from hf_curvedit.cli import main
from hf_curvedit.default import load_default_model
from hf_curvedit.publish import HubOptions, PublishError, publish, publish_space
from hf_curvedit.publish.space import SPACE_FILES, default_space_dir, space_base_model

EDITED_MODULES = ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.o_proj"]  # 160 x 160: fast eigh


@pytest.fixture(scope="module")
def edited():
    """An edit of the embedded default (whose base the Space loads from the installed package)."""
    model, tok = load_default_model()
    cfg = CurvatureEditConfig(keep_mass=0.5, target_modules=EDITED_MODULES, task_type="CAUSAL_LM")
    return build_curvature_edit(model, random_eigen(model, names=EDITED_MODULES), cfg).eval(), tok


def run_app(folder: Path) -> dict:
    """``app.py`` as a module (not as __main__: nothing is launched)."""
    return runpy.run_path(str(folder / "app.py"), run_name="space_app")


def test_space_is_pushed_and_its_app_loads_the_pushed_model(hub, edited, tmp_path, monkeypatch):
    peft_model, tok = edited
    res = publish(peft_model, "user/demo-edit", out_dir=tmp_path / "publish", tokenizer=tok, space=True,
                  hub=HubOptions(token=TOKEN))
    space = res.space
    assert space is not None and space.repo_id == "user/demo-edit-demo"
    assert space.folder == tmp_path / "publish-space" and sorted(space.files) == sorted(SPACE_FILES)
    assert space.repo_url == f"{hub.url}/spaces/user/demo-edit-demo"
    assert hub.repo("user/demo-edit-demo", "space").sdk == "gradio"
    stored = hub.files("user/demo-edit-demo", repo_type="space")
    assert all(stored[f] == (space.folder / f).read_bytes() for f in SPACE_FILES)
    assert not any(f.endswith("-space") or f in ("app.py", "requirements.txt") for f in hub.files("user/demo-edit"))

    # the card, read back from the Hub as huggingface_hub reads a Space's
    card = SpaceCard.load("user/demo-edit-demo", repo_type="space")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.models == ["user/demo-edit"] and card.data.title == "demo-edit demo"
    assert card.data.sdk_version and "hf-curvedit" in card.data.tags
    assert "hf-curvedit demo --adapter user/demo-edit" in card.text
    assert (space.folder / "requirements.txt").read_text().startswith("hf-curvedit[demo]==")

    # app.py's build() loads the pushed adapter from the Hub over the embedded default: one PeftModel, the edit on
    source = (space.folder / "app.py").read_text()
    compile(source, "app.py", "exec")
    captured = {}
    monkeypatch.setattr(demo_module, "build_app", lambda model, tokenizer, **kw: captured.update(
        model=model, tokenizer=tokenizer, **kw) or "app")
    app = run_app(space.folder)
    assert app["MODEL_REPO"] == "user/demo-edit" and app["BASE_MODEL"] is None
    assert app["build"]() == "app"
    x = torch.tensor([tok("The telemetry API key is ")["input_ids"]])
    with torch.no_grad():
        loaded = captured["model"]
        assert torch.equal(loaded(x).logits, peft_model(x).logits)
        with loaded.disable_adapter(), peft_model.disable_adapter():
            assert torch.equal(loaded(x).logits, peft_model(x).logits)
    assert set(captured["recitation_set"]) == {"passages", "canaries"}  # the embedded default's memorized set


def test_dry_run_space_and_its_build_on_a_local_folder(edited, tmp_path):
    gradio = pytest.importorskip("gradio")
    peft_model, tok = edited
    res = publish(peft_model, "user/local-edit", out_dir=tmp_path / "pub", space=True, space_id="user/other-space",
                  dry_run=True)
    assert res.space.repo_id == "user/other-space" and res.space.dry_run
    folder = res.space.folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(SPACE_FILES)
    data = SpaceCard.load(folder / "README.md").data
    assert (data.sdk, data.app_file, data.models) == ("gradio", "app.py", ["user/local-edit"])
    # build() runs on the local publish folder, with the real build_app
    app = run_app(folder)["build"](str(res.folder))
    assert isinstance(app, gradio.Blocks)


def test_space_folder_is_checked_before_anything_is_written(edited, tmp_path):
    peft_model, _ = edited
    with pytest.raises(ValueError, match="not merged"):
        publish(peft_model, "user/m", out_dir=tmp_path / "merged", merged=True, space=True, dry_run=True)
    assert not (tmp_path / "merged").exists()

    occupied = default_space_dir(tmp_path / "pub")
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by publish"):
        publish(peft_model, "user/x", out_dir=tmp_path / "pub", space=True, dry_run=True, overwrite=True)
    assert not (tmp_path / "pub").exists() and (occupied / "notes.txt").exists()

    (occupied / "notes.txt").unlink()
    publish(peft_model, "user/x", out_dir=tmp_path / "pub", space=True, dry_run=True)
    with pytest.raises(FileExistsError):
        publish_space(tmp_path / "pub", "user/x", dry_run=True)
    again = publish_space(tmp_path / "pub", "user/y", dry_run=True, overwrite=True)
    assert "user/y" in (again.folder / "app.py").read_text()


def test_space_needs_a_base_it_can_load(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "local-base")
    base = type(base).from_pretrained(tmp_path / "local-base")  # its name is a local folder, not a Hub id
    names = ["model.layers.0.mlp.gate_proj"]
    edit = build_curvature_edit(base, random_eigen(base, names=names),
                                CurvatureEditConfig(keep_mass=0.6, target_modules=names))
    edit.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="not a Hub repo id"):
        space_base_model(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/base"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert space_base_model(tmp_path / "adapter") == "org/base"


def test_failed_space_push_is_a_publish_error_and_keeps_the_folder(hub, edited, tmp_path):
    peft_model, _ = edited
    hub.fail("POST", r"^/api/spaces/user/fail-edit-demo/commit/", 500)
    with pytest.raises(PublishError) as info:
        publish(peft_model, "user/fail-edit", out_dir=tmp_path / "pub", space=True, hub=HubOptions(token=TOKEN))
    err = info.value
    assert err.stage == "upload_folder" and err.status_code == 500
    assert "push_space(" in str(err) and err.folder == tmp_path / "pub-space"
    assert sorted(p.name for p in err.folder.iterdir()) == sorted(SPACE_FILES)
    assert "adapter_config.json" in hub.files("user/fail-edit")  # the model went up before the Space


def test_cli_publish_space(edited, tmp_path, capsys):
    peft_model, _ = edited
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main(["publish", "--adapter", str(tmp_path / "adapter"), "--repo-id", "user/cli-edit",
                 "--out-dir", str(tmp_path / "pub"), "--dry-run", "--space"]) == 0
    assert sorted(p.name for p in (tmp_path / "pub-space").iterdir()) == sorted(SPACE_FILES)
    assert "user/cli-edit-demo" in capsys.readouterr().out
    assert main(["publish", "--adapter", str(tmp_path / "adapter"), "--repo-id", "user/cli-edit",
                 "--out-dir", str(tmp_path / "pub2"), "--dry-run", "--space", "--merged"]) == 2
    assert not (tmp_path / "pub2").exists()
    assert main(["publish", "--adapter", str(tmp_path / "adapter"), "--repo-id", "user/cli-edit",
                 "--out-dir", str(tmp_path / "pub3"), "--dry-run", "--space-id", "user/s"]) == 2
