"""The demo app (`hf_curvedit.demo`): served on 127.0.0.1 and called through gradio_client and a headless Chromium.

The model is the embedded default with a small edit (random eigenbases, ρ = 0.5 on attention projections of layer 2),
which changes its continuations. The default model may be retrained, so nothing here depends on the text it
generates: the app's columns must equal the model's own greedy generation with the adapter off and on, and differ.
"""

from __future__ import annotations

import gc
import html
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from testing_utils import random_eigen, slow
from transformers import PreTrainedModel

import hf_curvedit.demo as demo_module
from hf_curvedit import CurvatureEditConfig, build_curvature_edit
from hf_curvedit.cli import main
from hf_curvedit.default import load_default_model, memorized_prefix_suffix_ids
from hf_curvedit.demo import DEMO_INSTALL_HINT, EditDemo, build_app, longest_common_run, require_gradio
from hf_curvedit.evaluation import RecitationSet, evaluate_recitation
from hf_curvedit.evaluation.recitation import greedy_generate

# attention projections: 160 x 160, so their random eigenbases take no time (the MLP's 640-dim ones take seconds)
EDITED_MODULES = [f"model.layers.2.self_attn.{m}_proj" for m in ("q", "v", "o")]
MAX_NEW = 24
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def edited():
    """(PeftModel, tokenizer, recitation sets): the embedded default with a small edit, 3 canaries to recite."""
    model, tok = load_default_model()
    eigen = random_eigen(model, names=EDITED_MODULES)
    peft_model = build_curvature_edit(model, eigen, CurvatureEditConfig(keep_mass=0.5, target_modules=EDITED_MODULES))
    prefixes, suffixes = memorized_prefix_suffix_ids(tok, kind="canary")
    return peft_model.eval(), tok, {"canaries": RecitationSet(prefixes[:3], suffixes[:3])}


@pytest.fixture(scope="module")
def served(edited) -> Iterator[str]:
    """The app, serving on a free local port; closed when the module's tests are done."""
    pytest.importorskip("gradio")
    peft_model, tok, sets = edited
    app = build_app(peft_model, tok, recitation_set=sets, max_new_tokens=MAX_NEW)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served, verbose=False)


def canary(tok, i: int) -> tuple[str, str, list[int]]:
    """(prompt text, reference text, prompt ids) of canary ``i``: its prefix ids start with <eos>, as in training."""
    prefixes, suffixes = memorized_prefix_suffix_ids(tok, kind="canary")
    return tok.decode(prefixes[i], skip_special_tokens=True), tok.decode(suffixes[i]), prefixes[i]


def expected(peft_model, prompt_ids: list[int], *, edited: bool) -> list[int]:
    """Greedy continuation by the evaluation code's own decoder (not `generate`), adapter on or off."""
    if edited:
        return greedy_generate(peft_model, [prompt_ids], MAX_NEW, show_progress=False)[0]
    with peft_model.disable_adapter():
        return greedy_generate(peft_model, [prompt_ids], MAX_NEW, show_progress=False)[0]


def assert_greedy(app_ids: list[int], reference: list[int], eos: int) -> None:
    # the app stops at <eos>; the reference decoder never stops: the app's ids are its prefix
    assert app_ids == reference[:len(app_ids)]
    assert len(app_ids) == MAX_NEW or app_ids[-1] == eos


def brute_force_run(a: list[int], b: list[int]) -> int:
    return max([0] + [k for i in range(len(a)) for j in range(len(b))
                      for k in range(1, min(len(a) - i, len(b) - j) + 1) if a[i:i + k] == b[j:j + k]])


def visible_text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


# ------------------------------------------------------------------------------------------------ through the API
def test_generate_shows_base_and_edit_from_the_one_model(edited, client, monkeypatch):
    peft_model, tok, _ = edited
    prompt, reference, prompt_ids = canary(tok, 0)
    params_before = {n: p.data_ptr() for n, p in peft_model.named_parameters()}
    models_before = {id(o) for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)}
    constructed = []
    original_init = PreTrainedModel.__init__

    def counting_init(self, *args, **kwargs):
        constructed.append(type(self).__name__)
        original_init(self, *args, **kwargs)

    def no_loading(*args, **kwargs):
        raise AssertionError("the app loaded a model")

    # the app runs in this process (server threads): a second model would be constructed or loaded here
    monkeypatch.setattr(PreTrainedModel, "__init__", counting_init)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", no_loading)
    monkeypatch.setattr("peft.PeftModel.from_pretrained", no_loading)

    base_html, edited_html, summary, details = client.predict(
        prompt, reference, MAX_NEW, False, 1.0, 1.0, 0, api_name="/generate")

    assert details["prompt_ids"] == prompt_ids  # the <eos> the memorized prefixes start with is added
    assert details["reference_ids"] == tok(reference, add_special_tokens=False)["input_ids"]
    base_ids, edited_ids = details["base"]["ids"], details["edited"]["ids"]
    assert_greedy(base_ids, expected(peft_model, prompt_ids, edited=False), tok.eos_token_id)
    assert_greedy(edited_ids, expected(peft_model, prompt_ids, edited=True), tok.eos_token_id)
    assert base_ids != edited_ids  # the edit shows, so the test can fail

    # both columns show their continuation after the prompt; the marked run is the longest shared one
    for fragment, column in ((base_html, details["base"]), (edited_html, details["edited"])):
        assert visible_text(fragment).startswith(prompt)
        assert tok.decode(column["ids"], skip_special_tokens=True) in visible_text(fragment)
        assert column["match_length"] == brute_force_run(column["ids"], details["reference_ids"])
        marked = re.findall(r'<mark class="curvedit-match"[^>]*>(.*?)</mark>', fragment, re.S)
        run = column["ids"][column["match_start"]:column["match_start"] + column["match_length"]]
        assert [html.unescape(m) for m in marked] == ([tok.decode(run)] if run else [])
    assert "| base |" in summary and "| edited |" in summary

    # one model: none constructed or loaded, the same parameters, the same live models, the adapter back on
    assert constructed == []
    assert {n: p.data_ptr() for n, p in peft_model.named_parameters()} == params_before
    assert {id(o) for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)} <= models_before
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        on = peft_model(x).logits
        with peft_model.disable_adapter():
            off = peft_model(x).logits
    assert not torch.equal(on, off)


def test_sampling_is_reproducible_and_leaves_the_global_rng(edited, client):
    _, tok, _ = edited
    prompt, reference, _ = canary(tok, 1)
    rng = torch.get_rng_state()
    first = client.predict(prompt, reference, 12, True, 1.5, 0.9, 7, api_name="/generate")[3]
    again = client.predict(prompt, reference, 12, True, 1.5, 0.9, 7, api_name="/generate")[3]
    assert first["base"]["ids"] == again["base"]["ids"] and first["edited"]["ids"] == again["edited"]["ids"]
    assert 0 < len(first["base"]["ids"]) <= 12
    assert torch.equal(torch.get_rng_state(), rng)  # the seed is set inside a forked RNG


def test_bad_settings_are_refused(edited):
    peft_model, tok, _ = edited
    with pytest.raises(ValueError, match="max_new_tokens"):
        demo_module.GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        demo_module.GenerationSettings(do_sample=True, temperature=0.0)
    assert EditDemo(peft_model, tok).encode("") == [tok.bos_token_id]  # BOS alone: an unconditional sample
    with pytest.raises(ValueError, match="prompt is empty"):
        EditDemo(peft_model, tok, add_bos=False).encode("")


def test_recitation_table_reuses_the_recitation_metrics(edited, client):
    peft_model, tok, sets = edited
    table = client.predict(2, api_name="/recite")
    rows = [dict(zip(table["headers"], r)) for r in table["data"]]
    rs = sets["canaries"]
    assert len(rows) == 2 and [r["#"] for r in rows] == [0, 1]
    edited_res = evaluate_recitation(peft_model, rs.prefixes[:2], rs.suffixes[:2], show_progress=False)
    with peft_model.disable_adapter():
        base_res = evaluate_recitation(peft_model, rs.prefixes[:2], rs.suffixes[:2], show_progress=False)
    for row, b, e, suffix in zip(rows, base_res.examples, edited_res.examples, rs.suffixes):
        text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        assert row["gold suffix"] == text(suffix)
        assert row["base"] == text(b.prediction) and row["edited"] == text(e.prediction)
        assert row["base Strict"] == ("yes" if b.strict() else "no")
        assert row["edited Strict"] == ("yes" if e.strict() else "no")
        assert row["base Lev d/L"] == pytest.approx(b.normalized, abs=1e-3)
        assert row["edited Lev d/L"] == pytest.approx(e.normalized, abs=1e-3)


def test_longest_common_run_and_segments(edited):
    assert longest_common_run([5, 1, 2, 3, 9], [7, 1, 2, 3]) == (1, 1, 3)
    assert longest_common_run([], [1]) == (0, 0, 0)
    # frequent tokens in long sequences still count (difflib's autojunk would drop them)
    a = [1] * 300 + [2]
    assert longest_common_run(a, [1] * 250)[2] == 250
    peft_model, tok, _ = edited
    d = EditDemo(peft_model, tok)
    c = demo_module.Continuation(tok("xxabcyy", add_special_tokens=False)["input_ids"], 2, 3, 0)
    assert d.segments(c) == [("xx", False), ("abc", True), ("yy", False)]
    assert "&lt;b&gt;" in d.render(demo_module.Continuation(tok("<b>", add_special_tokens=False)["input_ids"]), [])


# ------------------------------------------------------------------------------------------------ in a browser
@slow
def test_browser_shows_both_outputs(edited, served, tmp_path):
    required = os.environ.get("HF_CURVEDIT_REQUIRE_BROWSER") == "1"  # CI sets it: a missing browser fails there
    if not (CHROMIUM and CHROMEDRIVER):
        if required:
            pytest.fail("HF_CURVEDIT_REQUIRE_BROWSER=1 but chromium/chromedriver are not installed "
                        "(apt-get install -y chromium chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed")
    if not required:
        pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    peft_model, tok, _ = edited
    prompt, reference, prompt_ids = canary(tok, 2)  # not the page's initial example: the page must be driven
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    # an explicit chromedriver: Selenium Manager would otherwise try to download one
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.get(served)
        wait = WebDriverWait(driver, 30)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        ref_box = driver.find_element(By.CSS_SELECTOR, "#reference textarea")
        box.clear()
        box.send_keys(prompt)
        ref_box.clear()
        ref_box.send_keys(reference)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def shown(name: str, part: str) -> str:
            found = driver.find_elements(By.CSS_SELECTOR, f"#{name}-output .curvedit-output > {part}")
            return "".join(e.get_attribute("textContent") or "" for e in found)

        # wait for this prompt's result (the page also generates for its initial example on load)
        wait.until(lambda d: all(shown(n, ".curvedit-prompt") == prompt for n in ("base", "edited")))
        want_base = tok.decode(expected(peft_model, prompt_ids, edited=False), skip_special_tokens=True)
        want_edited = tok.decode(expected(peft_model, prompt_ids, edited=True), skip_special_tokens=True)
        continuation = ":is(.curvedit-new, .curvedit-match)"
        base_text, edited_text = shown("base", continuation), shown("edited", continuation)
        # the columns hold the greedy continuations (cut at <eos>, which the page does not show)
        assert base_text and want_base.startswith(base_text)
        assert edited_text and want_edited.startswith(edited_text)
        assert base_text != edited_text
        shot = tmp_path / "demo.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------------ loading + CLI
def test_launch_demo_loads_an_adapter_folder(edited, tmp_path):
    from gradio_client import Client

    peft_model, tok, _ = edited
    peft_model.save_pretrained(tmp_path / "adapter")
    port = free_port()
    app = demo_module.launch_demo(tmp_path / "adapter", port=port, prevent_thread_lock=True, quiet=True)
    try:
        assert app.local_url.startswith(f"http://127.0.0.1:{port}")
        prompt, reference, prompt_ids = canary(tok, 0)
        details = Client(app.local_url, verbose=False).predict(prompt, reference, MAX_NEW, False, 1.0, 1.0, 0,
                                                               api_name="/generate")[3]
        assert_greedy(details["edited"]["ids"], expected(peft_model, prompt_ids, edited=True), tok.eos_token_id)
        assert_greedy(details["base"]["ids"], expected(peft_model, prompt_ids, edited=False), tok.eos_token_id)
    finally:
        app.close()


def test_cli_demo_passes_its_flags(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo_module, "launch_demo", lambda *a, **kw: calls.append((a, kw)))
    (tmp_path / "quotes.txt").write_text("a quote that is long enough to split\n")
    assert main(["demo", "--adapter", "some/adapter", "--port", "7999", "--recitation",
                 f"q={tmp_path / 'quotes.txt'}"]) == 0
    (adapter, base), kw = calls[0]
    assert adapter == "some/adapter" and base is None and kw["port"] == 7999 and kw["host"] == "127.0.0.1"
    assert kw["recitation"] == {"q": str(tmp_path / "quotes.txt")} and kw["work_dir"] == "runs/demo"


def test_cli_demo_base_needs_adapter(capsys):
    pytest.importorskip("gradio")
    assert main(["demo", "--base", "some/model"]) == 2
    assert "--base needs --adapter" in capsys.readouterr().err


def test_without_gradio_says_how_to_install(edited, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(ImportError, match=re.escape(DEMO_INSTALL_HINT)):
        require_gradio()
    with pytest.raises(ImportError, match=re.escape(DEMO_INSTALL_HINT)):
        build_app(*edited[:2])
    assert main(["demo"]) == 1
    assert DEMO_INSTALL_HINT in capsys.readouterr().err


def test_demo_refuses_a_model_without_adapter(edited):
    with pytest.raises(TypeError, match="PeftModel"):
        EditDemo(edited[0].get_base_model(), edited[1])


def test_demo_module_imports_without_gradio():
    # gradio is imported when an app is built, never at import: the CLI and library work without the extra
    src = Path(demo_module.__file__).read_text()
    assert not re.search(r"^(import gradio|from gradio)", src, re.M)
