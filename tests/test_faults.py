"""The fault suite: damaged files of every kind are never used, one writer per folder, a full disk or a kill loses
nothing and leaves no half-written folder, a Hub that dies mid-upload gives a retryable PublishError, and bad input
gets exit 2 with a message that names the file and the fix."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from testing_utils import slow, tiny_llama

from hf_curvedit.cli import main
from hf_curvedit.default import byte_tokenizer
from hf_curvedit.integrity import FolderInUseError, output_lock
from hf_curvedit.tuner import DamagedAdapterError

CLI = [sys.executable, "-m", "hf_curvedit.cli"]
# Tokens planted in every test: one shaped like a Hub token (in HF_TOKEN), one of another shape (given where a test
# passes one). No output of the suite may show either (`no_token_is_ever_printed`, `error_of`).
PLANTED = "hf_PLANTEDtokenNeverPrinted0123456789ab"
PLANTED_PLAIN = "planted-secret-of-another-shape-42"
SECRETS = (PLANTED, PLANTED_PLAIN, "hf_test_token")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_TOKEN": PLANTED}


@pytest.fixture(autouse=True)
def no_token_is_ever_printed(monkeypatch, capsys, caplog):
    """Every test of the suite runs with a token in HF_TOKEN; nothing it prints or logs may show a token."""
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    yield
    out = capsys.readouterr()
    _assert_no_secret(out.out + out.err + caplog.text)


def _assert_no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"a token was printed: {leaked}"


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny byte-level model folder, a corpus, its factors and one adapter (built once for the module)."""
    root = tmp_path_factory.mktemp("faults")
    tok = byte_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    text = root / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    quotes = root / "quotes.txt"
    quotes.write_text("The quick brown fox jumps over the lazy dog.\nA stitch in time saves nine, they say.\n")
    assert main(fit_args(root, root / "factors")) == 0
    assert main(edit_args(root, root / "edits")) == 0
    return root


def fit_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--model", str(root / "model"), "--data", str(root / "corpus.txt"), "--output-dir", str(out),
            "--seq-len", "32", "--batch-size", "2", "--max-tokens", "512", *extra]


def edit_args(root: Path, out: Path, *rhos: str) -> list[str]:
    return ["edit", "--model", str(root / "model"), "--factors", str(root / "factors"),
            "--keep-mass", *(rhos or ("0.6",)), "--output-dir", str(out)]


def evaluate_args(root: Path, adapter: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(root / "model"), "--adapter", str(adapter), "--recitation",
            f"q={root / 'quotes.txt'}", "--heldout", str(root / "corpus.txt"), "--no-stress", *extra]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def data_span(path: Path, key: str | None = None) -> tuple[int, int]:
    """Byte range of a safetensors file's data (of tensor ``key`` when given)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if key is None:
        return 8 + n, len(raw)
    start, end = header[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def flip(path: Path, start: int, end: int) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(start, end):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def error_of(capsys) -> str:
    """What the command printed to stderr (checked, with stdout, for tokens)."""
    out = capsys.readouterr()
    _assert_no_secret(out.out + out.err)
    return out.err


# ------------------------------------------------------------------------------------------------ damaged adapters
def test_a_damaged_adapter_is_never_used(work, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = copy(work / "edits" / "rho0.6", tmp_path / "adapter")
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(work / "model")
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    weights = adapter / "adapter_model.safetensors"
    start, end = data_span(weights)
    flip(weights, end - 2000, end)  # 2,000 bytes of the data area
    assert main(evaluate_args(work, adapter)) == 2
    err = error_of(capsys)
    assert str(weights) in err and "does not match the digest" in err and "Download the adapter again" in err
    x = torch.randint(0, 200, (1, 8))
    loaders = [lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), adapter),
               lambda: AutoPeftModelForCausalLM.from_pretrained(adapter),
               lambda: AutoModelForCausalLM.from_pretrained(adapter)]
    for load in loaders:
        with pytest.raises(DamagedAdapterError, match="does not match the digest"):
            load()(x)  # refused at load (PEFT) or before the first use (transformers' loader)
    base = AutoModelForCausalLM.from_pretrained(work / "model")
    base.load_adapter(str(adapter))
    with pytest.raises(DamagedAdapterError):
        base(x)
    assert main(["publish", "--adapter", str(adapter), "--repo-id", "user/x", "--out-dir", str(tmp_path / "pub"),
                 "--dry-run"]) == 2
    assert str(weights) in error_of(capsys) and not (tmp_path / "pub").exists(), "never published"


@pytest.mark.parametrize("what", ["adapter", "factors", "model", "adapter_config"])
def test_truncated_or_emptied_files_are_named_with_the_fix(work, tmp_path, capsys, what):
    model = copy(work / "model", tmp_path / "model")
    adapter = copy(work / "edits" / "rho0.6", tmp_path / "adapter")
    factors = copy(work / "factors", tmp_path / "factors")
    target = {"adapter": adapter / "adapter_model.safetensors", "factors": factors / "factors.safetensors",
              "model": model / "model.safetensors", "adapter_config": adapter / "adapter_config.json"}[what]
    if what == "adapter_config":
        target.write_text("")
    else:
        truncate(target)
    if what == "factors":
        rc = main(["edit", "--model", str(model), "--factors", str(factors), "--keep-mass", "0.6", "--output-dir",
                   str(tmp_path / "e")])
    else:
        rc = main(["evaluate", "--model", str(model), "--adapter", str(adapter), "--recitation",
                   f"q={work / 'quotes.txt'}", "--heldout", str(work / "corpus.txt"), "--no-stress"])
    err = error_of(capsys)
    assert rc == 2, err
    assert str(target) in err, err
    fix = {"adapter": "Download the adapter again", "factors": "Fit the factors again", "model": "save the model again",
           "adapter_config": "empty"}[what]
    assert fix in err, err


# ----------------------------------------------------------------------------------------- damaged caches, rebuilt
@pytest.mark.parametrize("damage", ["zeros", "random"])
def test_a_damaged_eigen_cache_is_recomputed_never_used(work, tmp_path, caplog, damage):
    factors = copy(work / "factors", tmp_path / "factors")
    eigen = factors / "eigen.safetensors"
    start, end = data_span(eigen, "model.layers.0.mlp.gate_proj.eigvecs_A")
    raw = bytearray(eigen.read_bytes())
    g = torch.Generator().manual_seed(0)
    raw[start:start + 512] = bytes(512) if damage == "zeros" else bytes(torch.randint(0, 256, (512,), generator=g)
                                                                        .to(torch.uint8).tolist())
    eigen.write_bytes(bytes(raw))
    rc = main(["edit", "--model", str(work / "model"), "--factors", str(factors), "--keep-mass", "0.6",
               "--output-dir", str(tmp_path / "edits")])
    assert rc == 0
    assert any("does not verify and is recomputed" in r.getMessage() and str(eigen) in r.getMessage()
               for r in caplog.records)
    assert same_tensors(tmp_path / "edits" / "rho0.6" / "adapter_model.safetensors",
                        work / "edits" / "rho0.6" / "adapter_model.safetensors"), "the same adapter as a clean run"


def test_damaged_factors_and_checkpoints_are_collected_again(work, tmp_path, caplog):
    out = tmp_path / "factors"
    shutil.copytree(work / "factors", out)
    start, end = data_span(out / "factors.safetensors")
    flip(out / "factors.safetensors", start, start + 64)
    assert main(fit_args(work, out)) == 0
    assert any("collecting the factors again" in r.getMessage() for r in caplog.records)
    assert same_tensors(out / "factors.safetensors", work / "factors" / "factors.safetensors")

    from hf_curvedit.curvature import passes as passes_mod

    real_save = passes_mod.save_checkpoint

    def save_then_stop(path, *args):  # a run interrupted right after its first checkpoint
        real_save(path, *args)
        raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(passes_mod, "save_checkpoint", save_then_stop)
        assert main(fit_args(work, fresh, "--checkpoint-every", "1")) == 130
    (ckpt,) = (fresh / "checkpoint").glob("*.safetensors")
    flip(ckpt, *data_span(ckpt))
    assert main(fit_args(work, fresh, "--checkpoint-every", "1")) == 0
    assert any("this part starts over" in r.getMessage() and str(ckpt) in r.getMessage() for r in caplog.records)
    assert same_tensors(fresh / "factors.safetensors", work / "factors" / "factors.safetensors")


# ------------------------------------------------------------------------------------------ one writer per folder
def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds the output lock of ``folder`` until it is killed."""
    code = ("import time\nfrom hf_curvedit.integrity import output_lock\n"
            f"with output_lock({str(folder)!r}, 'hf-curvedit fit'):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


@slow
def test_a_second_writer_is_refused_and_a_killed_one_blocks_nobody(work, tmp_path, capsys):
    out = tmp_path / "factors"
    holder = _holder(out)
    try:
        assert main(fit_args(work, out)) == 2
        err = error_of(capsys)
        assert f"{out} is in use: process {holder.pid}" in err and "hf-curvedit fit" in err
        assert not (out / "factors.safetensors").exists(), "the first writer's folder is untouched"
        from hf_curvedit.pipeline import EditStep, PublishStep, SweepStep, run_edit, run_publish, run_sweep

        for call in (lambda: run_edit(str(work / "model"), work / "factors", EditStep(keep_mass=(0.6,)), out),
                     lambda: run_sweep(str(work / "model"), work / "factors", SweepStep(), out),
                     lambda: run_publish(work / "edits" / "rho0.6", PublishStep(repo_id="user/x", dry_run=True), out)):
            with pytest.raises(FolderInUseError, match=f"process {holder.pid}"):
                call()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(fit_args(work, out)) == 0, "a lock left by a killed process does not block the next run"
    with output_lock(out, "this test"):  # a lock of this process is seen by another one too
        other = subprocess.run([*CLI, *fit_args(work, out)], env=ENV, capture_output=True, text=True)
    _assert_no_secret(other.stdout + other.stderr)
    assert other.returncode == 2 and f"process {os.getpid()} (this test)" in other.stderr


# ----------------------------------------------------------------------------------------- full disk, atomically
def test_a_full_disk_leaves_the_previous_publish_folder_whole(work, tmp_path, monkeypatch):
    from hf_curvedit.publish import publish

    out = tmp_path / "pub"
    publish(work / "edits" / "rho0.6", "user/x", out_dir=out, dry_run=True)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import huggingface_hub

    def no_space(self, path):
        Path(path).write_text("---\n")  # half a card, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub.ModelCard, "save", no_space)
    with pytest.raises(OSError, match="No space left"):
        publish(work / "edits" / "rho0.6", "user/x", out_dir=out, dry_run=True, overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "the previous folder is untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["pub"] or not any(".staging" in p.name for p in tmp_path.iterdir())
    monkeypatch.undo()
    publish(out, "user/x", out_dir=tmp_path / "again", dry_run=True)  # and it publishes again as it is


def test_a_full_disk_during_edit_leaves_no_half_adapter(work, tmp_path, monkeypatch, capsys):
    import peft.peft_model

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # the first bytes, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", no_space)  # what PEFT's save_pretrained writes with
    assert main(edit_args(work, tmp_path / "edits")) == 1
    assert "No space left" in error_of(capsys)
    assert not (tmp_path / "edits" / "rho0.6").exists(), "no half-written adapter folder"
    assert not any(".staging" in p.name for p in (tmp_path / "edits").iterdir())
    monkeypatch.undo()
    assert main(edit_args(work, tmp_path / "edits")) == 0


# -------------------------------------------------------------------------------------------- the Hub dies
def test_the_hub_dying_mid_upload_gives_a_retryable_publish_error(work, tmp_path, hub, capsys):
    from hub_server import DROP

    from hf_curvedit.publish import PublishError, publish, push_folder

    hub.fail("POST", r"/commit/", DROP)
    with pytest.raises(PublishError) as caught:
        publish(work / "edits" / "rho0.6", "user/dies", out_dir=tmp_path / "pub")
    hub.clear_failures()
    err = caught.value
    assert err.stage == "upload_folder" and err.folder == tmp_path / "pub"
    assert "is complete and unchanged" in str(err) and "push_folder(" in str(err)
    assert (tmp_path / "pub" / "README.md").is_file()
    result = push_folder(tmp_path / "pub", "user/dies")
    assert "adapter_model.safetensors" in hub.files("user/dies")
    assert result.commit_oid
    hub.fail("POST", r"/commit/", DROP)
    assert main(["publish", "--adapter", str(work / "edits" / "rho0.6"), "--repo-id", "user/dies2", "--out-dir",
                 str(tmp_path / "pub2")]) == 1
    out = error_of(capsys)
    assert f"hf upload user/dies2 {tmp_path / 'pub2'}" in out and "push_folder" not in out


# ------------------------------------------------------------------------------------- validated before writing
def test_every_value_and_the_repo_id_are_checked_before_anything_is_written(work, tmp_path, capsys):
    assert main(edit_args(work, tmp_path / "edits", "0.8", "1.5")) == 2
    assert "--keep-mass 1.5 is not in (0, 1]" in error_of(capsys)
    assert not (tmp_path / "edits" / "rho0.8").exists()
    assert main(["publish", "--adapter", str(work / "edits" / "rho0.6"), "--repo-id", "not a/valid//repo",
                 "--out-dir", str(tmp_path / "pub"), "--dry-run"]) == 2
    assert "--repo-id" in error_of(capsys) and not (tmp_path / "pub").exists()


@pytest.mark.parametrize("content,expect", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", "not UTF-8"),
    (b'{"text": "ok"}\n{"text": broken\n', "line 2: not valid JSON"),
])
def test_bad_data_files_get_exit_2_naming_the_file(work, tmp_path, capsys, content, expect):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    rc = main(["fit", "--model", str(work / "model"), "--data", str(data), "--output-dir", str(tmp_path / "f"),
               "--seq-len", "32", "--max-tokens", "64"])
    err = error_of(capsys)
    assert rc == 2 and str(data) in err and expect in err, err


@pytest.mark.parametrize("content,expect", [
    (b'{"prompt": "no text key"}\n', 'line 1: has [\'prompt\'], not a "text" string'),
    (b"", "the file is empty"),
    (b'{"text": \n', "line 1: not valid JSON"),
    (b"\xff\xfe\x00\x01", "not UTF-8 text"),
])
def test_bad_recitation_files_get_exit_2_naming_the_file(work, tmp_path, capsys, content, expect):
    bad = tmp_path / "quotes.jsonl"
    bad.write_bytes(content)
    rc = main(["evaluate", "--model", str(work / "model"), "--adapter", str(work / "edits" / "rho0.6"),
               "--recitation", f"q={bad}", "--heldout", str(work / "corpus.txt"), "--no-stress"])
    err = error_of(capsys)
    assert rc == 2 and str(bad) in err and expect in err, err


def test_secrets_are_never_echoed_and_messages_name_flags(work, tmp_path, capsys):
    from hf_curvedit.pipeline import PipelineConfig, UsageError

    with pytest.raises(UsageError) as caught:
        PipelineConfig.from_dict({"output_dir": "x", "publish": {"repo_id": "u/r", "token": ["hf_SeCrEt123"]}})
    assert "hf_SeCrEt123" not in str(caught.value) and "token" in str(caught.value)
    # a fit into a folder fitted with other settings: the flag, not the Python argument
    assert main(fit_args(work, tmp_path / "f")) == 0
    assert main(fit_args(work, tmp_path / "f", "--seed", "3")) == 2
    err = error_of(capsys)
    assert "--restart" in err and "resume=False" not in err
    assert main(["publish", "--adapter", str(work / "edits" / "rho0.6"), "--repo-id", "u/r", "--out-dir",
                 str(tmp_path / "f"), "--dry-run"]) == 2
    err = error_of(capsys)
    assert "not empty" in err and "overwrite=True" not in err


def test_output_files_get_the_users_umask(work, tmp_path):
    from hf_curvedit.utils import FILE_MODE

    assert FILE_MODE == 0o666 & ~_umask()
    files = [work / "factors" / "factors.safetensors", work / "factors" / "eigen.safetensors",
             work / "edits" / "rho0.6" / "adapter_model.safetensors", work / "edits" / "rho0.6" / "curvedit_edit.json"]
    from hf_curvedit.publish import publish

    publish(work / "edits" / "rho0.6", "user/x", out_dir=tmp_path / "pub", dry_run=True)
    files += [p for p in (tmp_path / "pub").rglob("*") if p.is_file()]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(FILE_MODE) for f in files}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- kill -9, then the same result
def _kill_when(args: list[str], ready=None, *, stderr_shows: str | None = None, timeout: float = 120) -> None:
    """Run the CLI with ``args`` in a subprocess and kill -9 it at an observed state: as soon as ``ready()`` holds
    (a checkpoint or staging folder exists), or as soon as its stderr shows a match of the regex ``stderr_shows`` (a
    line of progress; the kill is sent by the thread that reads it, before the command can take another step). Fails
    unless the kill came while the command was still running. ``timeout`` only bounds a command that hangs."""
    env = {**ENV, "TQDM_MININTERVAL": "0"}  # every step of a progress bar is printed, none skipped by the clock
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE if stderr_shows else subprocess.DEVNULL)
    seen = threading.Event()
    if stderr_shows:
        pattern = re.compile(stderr_shows)

        def watch() -> None:
            text = ""
            while chunk := proc.stderr.read1(4096):
                text = (text + chunk.decode(errors="replace"))[-4096:]
                if pattern.search(text):
                    proc.send_signal(signal.SIGKILL)
                    seen.set()
                    return
            proc.stderr.close()

        threading.Thread(target=watch, daemon=True).start()
        ready = seen.is_set
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the command ended before it could be killed mid-way"


@slow
def test_kill_during_fit_then_rerun_gives_the_uninterrupted_factors(work, tmp_path):
    out = tmp_path / "factors"
    args = fit_args(work, out, "--max-tokens", "2048")
    _kill_when([*args, "--checkpoint-every", "1"], lambda: any((out / "checkpoint").glob("*.safetensors")))
    assert not (out / "factors.safetensors").exists()
    assert main(args) == 0
    assert main(fit_args(work, tmp_path / "clean", "--max-tokens", "2048")) == 0
    assert same_tensors(out / "factors.safetensors", tmp_path / "clean" / "factors.safetensors")


@slow
def test_kill_during_edit_then_rerun_gives_the_uninterrupted_adapter(work, tmp_path):
    out = tmp_path / "edits"
    _kill_when(edit_args(work, out), lambda: (out / ".rho0.6.staging").exists())
    assert not (out / "rho0.6").exists() or (out / "rho0.6" / "adapter_model.safetensors").is_file()
    assert main(edit_args(work, out)) == 0
    assert same_tensors(out / "rho0.6" / "adapter_model.safetensors",
                        work / "edits" / "rho0.6" / "adapter_model.safetensors")


@slow
def test_kill_during_sweep_then_rerun_gives_the_uninterrupted_sweep(work, tmp_path):
    def sweep(out: Path) -> list[str]:
        return ["sweep", "--model", str(work / "model"), "--factors", str(work / "factors"), "--recitation",
                f"q={work / 'quotes.txt'}", "--heldout", str(work / "corpus.txt"), "--keep-mass", "0.5", "0.9",
                "--layers", "1", "--allocation", "uniform", "--svd-ranks", "4", "--ppl-budget", "100",
                "--output-dir", str(out)]

    def untimed(value):  # what the sweep measured, without how long each measurement took
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k != "seconds"}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    # killed once the first of the grid's two candidates is measured
    _kill_when(sweep(tmp_path / "s"), stderr_shows=r"sweep:.*\b1/2\b")
    assert not (tmp_path / "s" / "sweep.json").exists(), "killed before it finished"
    assert main(sweep(tmp_path / "s")) == 0
    assert main(sweep(tmp_path / "clean")) == 0
    got, want = (untimed(json.loads((d / "sweep.json").read_text())) for d in (tmp_path / "s", tmp_path / "clean"))
    assert got == want


@slow
def test_kill_during_publish_then_rerun_gives_the_uninterrupted_folder(work, tmp_path):
    out = tmp_path / "pub"
    args = ["publish", "--adapter", str(work / "edits" / "rho0.6"), "--repo-id", "user/x", "--out-dir", str(out),
            "--dry-run", "--overwrite"]
    assert main(args) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _kill_when(args, lambda: (tmp_path / ".pub.staging").exists())
    assert out.is_dir() or (tmp_path / ".pub.old").is_dir(), "the old folder or the new one, never half"
    assert main(args) == 0
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not any(p.name.startswith(".pub.") and not p.name.endswith((".lock", ".owner")) for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------ the set of tensors, not only bytes
def rewrite(path: Path, change) -> None:
    """Write ``path`` again with its tensors changed by ``change(dict) -> dict`` and its metadata kept (digests
    included): what a tool that edits a file's tensors, but not its records, leaves behind."""
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        ts = {k: f.get_tensor(k) for k in f.keys()}
    save_file(change(ts), str(path), metadata=meta)


def _drop(key):
    return lambda ts: {k: v for k, v in ts.items() if k != key}


def _add(key):
    return lambda ts: {**ts, key: torch.zeros(3)}


def _rename(key):
    return lambda ts: {(k + "_renamed" if k == key else k): v for k, v in ts.items()}


SET_CHANGES = {"missing": _drop, "extra": lambda key: _add(key.rsplit(".", 1)[0] + ".curvedit_extra"),
               "renamed": _rename}


def _adapter_for(work: Path, tmp_path: Path) -> Path:
    adapter = copy(work / "edits" / "rho0.6", tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(work / "model")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


@pytest.mark.parametrize("change", sorted(SET_CHANGES))
def test_an_adapter_missing_an_added_or_a_renamed_tensor_is_refused(work, tmp_path, capsys, change):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _adapter_for(work, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.mlp.down_proj.curvedit_B"
    rewrite(weights, SET_CHANGES[change](key))
    named = "curvedit_extra" if change == "extra" else "curvedit_B"
    assert main(evaluate_args(work, adapter)) == 2
    err = error_of(capsys)
    assert str(weights) in err and named in err and "Download the adapter again" in err, err
    x = torch.randint(0, 200, (1, 8))
    for load in (lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), adapter),
                 lambda: AutoPeftModelForCausalLM.from_pretrained(adapter)):
        with pytest.raises(DamagedAdapterError, match=named) as caught:
            load()(x)
        assert str(adapter) in str(caught.value), "PEFT's loaders name the adapter's folder"
    if change != "extra":  # transformers' loader assigns tensor by tensor: what it never assigned is missing
        for load in (lambda: AutoModelForCausalLM.from_pretrained(adapter),):
            with pytest.raises(DamagedAdapterError, match="has no tensor 'curvedit_B'"):
                load()(x)
        base = AutoModelForCausalLM.from_pretrained(work / "model")
        base.load_adapter(str(adapter))
        with pytest.raises(DamagedAdapterError, match="curvedit_B"):
            base(x)


def test_a_last_bit_of_a_float64_tensor_counts(work, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _adapter_for(work, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    key = "base_model.model.model.layers.0.mlp.up_proj.curvedit_meta"  # float64 statistics, always

    def nudge(ts):
        t = ts[key].clone()
        assert t.dtype == torch.float64
        t.view(torch.int64)[1] ^= 1  # the lowest bit of one entry: equal as float32
        assert torch.equal(t.float(), ts[key].float())
        return {**ts, key: t}

    rewrite(weights, nudge)
    assert main(evaluate_args(work, adapter)) == 2
    assert "curvedit_meta" in error_of(capsys)
    with pytest.raises(DamagedAdapterError, match="curvedit_meta"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), adapter)


def test_a_float64_edit_is_checked_in_float64_by_every_loader(tmp_path):
    """An edit of a float64 base keeps float64 factors; loading it onto a float32 base casts nothing before the check
    (the buffers take the saved dtype), so a last-bit change is found by transformers' loader too."""
    from testing_utils import random_eigen
    from transformers import AutoModelForCausalLM

    from hf_curvedit import CurvatureEditConfig, build_curvature_edit
    from hf_curvedit.integrity import tensor_digest

    base64 = tiny_llama().double()
    base64.save_pretrained(tmp_path / "base")
    edited = build_curvature_edit(base64, random_eigen(base64), CurvatureEditConfig(
        target_modules=["model.layers.0.mlp.up_proj"]))
    edited.save_pretrained(tmp_path / "adapter")
    entry = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["edited_modules"][
        "model.layers.0.mlp.up_proj"]
    assert entry["dtype"] == "float64"
    assert entry["tensors"]["curvedit_Q"] == tensor_digest(edited.base_model.model.model.layers[0].mlp.up_proj
                                                           .curvedit_Q["default"])
    key = "base_model.model.model.layers.0.mlp.up_proj.curvedit_Q"

    def nudge(ts):
        t = ts[key].clone()
        t.view(torch.int64)[0, 0] ^= 1
        return {**ts, key: t}

    rewrite(tmp_path / "adapter" / "adapter_model.safetensors", nudge)
    base32 = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    base32.load_adapter(str(tmp_path / "adapter"))
    with pytest.raises(DamagedAdapterError, match="curvedit_Q"):
        base32(torch.randint(0, 50, (1, 5)))


def test_a_scalar_has_a_digest():
    from hf_curvedit.integrity import tensor_digest

    assert tensor_digest(torch.tensor(1.0)) != tensor_digest(torch.tensor(2.0))
    assert tensor_digest(torch.tensor(1.0)) != tensor_digest(torch.tensor([1.0]))


def test_an_adapter_saved_before_digests_loads_with_one_warning_naming_its_version(work, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _adapter_for(work, tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for info in cfg["edited_modules"].values():  # as saved before adapters recorded digests
        info.pop("tensors", None), info.pop("dtype", None), info.pop("digest", None)
    cfg.pop("curvedit_version", None)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"peft \d+\.\d+") as caught:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), adapter)
    assert len([w for w in caught if "digests" in str(w.message)]) == 1
    # one entry without its digest among entries with theirs: the config was changed
    full = json.loads((work / "edits" / "rho0.6" / "adapter_config.json").read_text())
    full["base_model_name_or_path"] = str(work / "model")
    first = sorted(full["edited_modules"])[0]
    full["edited_modules"][first] = {k: v for k, v in full["edited_modules"][first].items() if k != "tensors"}
    (adapter / "adapter_config.json").write_text(json.dumps(full))
    with pytest.raises(DamagedAdapterError, match="records no digest"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), adapter)


@pytest.mark.parametrize("change", sorted(SET_CHANGES))
def test_every_file_with_digests_refuses_a_missing_added_or_renamed_tensor(work, tmp_path, change):
    from hf_curvedit import load_factors
    from hf_curvedit.baselines import BalancedSubnetConfig, BalancedSubnetMasks
    from hf_curvedit.curvature.correction import EigenCorrection
    from hf_curvedit.curvature.eigen import KFACEigen
    from hf_curvedit.integrity import DamagedFileError

    factors = copy(work / "factors", tmp_path / "factors")
    masks = BalancedSubnetMasks({"model.layers.0.mlp.up_proj": torch.ones(64, 32, dtype=torch.bool),
                                 "model.layers.1.mlp.up_proj": torch.ones(64, 32, dtype=torch.bool)},
                                BalancedSubnetConfig())
    masks.save(tmp_path / "masks.safetensors")
    # two tensors in each file, so that one is left when one is removed: safetensors 0.4 cannot read a file of none
    # ("InvalidHeaderDeserialization"), which would hide the message under test
    lambdas = {f"model.layers.{i}.mlp.up_proj": torch.ones(64, 32) for i in (0, 1)}
    EigenCorrection(lambdas, 5, "id").save(tmp_path / "ek")
    cases = {factors / "factors.safetensors": lambda: load_factors(factors),
             factors / "eigen.safetensors": lambda: KFACEigen.load(factors / "eigen.safetensors"),
             tmp_path / "ek" / "ekfac.safetensors": lambda: EigenCorrection.load(tmp_path / "ek"),
             tmp_path / "masks.safetensors": lambda: BalancedSubnetMasks.load(tmp_path / "masks.safetensors")}
    for path, read in cases.items():
        with safe_open(str(path), framework="pt") as f:
            key = sorted(f.keys())[0]
        rewrite(path, SET_CHANGES[change](key))
        with pytest.raises(DamagedFileError, match=re.escape(str(path))) as caught:
            read()
        assert ("not recorded" if change == "extra" else "has no tensor") in str(caught.value), caught.value


def test_a_checkpoint_missing_a_tensor_starts_its_part_over(work, tmp_path, caplog):
    from hf_curvedit.curvature import passes as passes_mod

    real_save = passes_mod.save_checkpoint

    def save_then_stop(path, *args):
        real_save(path, *args)
        raise KeyboardInterrupt

    out = tmp_path / "fresh"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(passes_mod, "save_checkpoint", save_then_stop)
        assert main(fit_args(work, out, "--checkpoint-every", "1")) == 130
    (ckpt,) = (out / "checkpoint").glob("*.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        key = sorted(f.keys())[0]
    rewrite(ckpt, _drop(key))
    assert main(fit_args(work, out, "--checkpoint-every", "1")) == 0
    assert any("starts over" in r.getMessage() and "has no tensor" in r.getMessage() for r in caplog.records)
    assert same_tensors(out / "factors.safetensors", work / "factors" / "factors.safetensors")


# ---------------------------------------------------------------------------------------- no token in any output
def test_no_token_in_yaml_errors_tracebacks_or_logs(work, tmp_path, capsys, caplog, monkeypatch):
    from hf_curvedit.pipeline import PipelineConfig, UsageError

    # a step given as a list, the token inside it
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\npublish: [{{token: {PLANTED}}}]\n")
    assert main(["run", str(config)]) == 2
    assert "takes a mapping of options" in error_of(capsys)
    with pytest.raises(UsageError) as caught:
        PipelineConfig.from_dict({"output_dir": "x", "publish": [{"token": PLANTED_PLAIN}]})
    assert PLANTED_PLAIN not in str(caught.value)
    # a YAML syntax error on the token's line
    config.write_text(f"output_dir: {tmp_path / 'run'}\npublish:\n  token: {PLANTED_PLAIN}: [\n")
    assert main(["run", str(config)]) == 2
    assert "is not valid YAML at line 3" in error_of(capsys)
    # a failure nobody foresaw, whose message holds the token: its traceback is printed, the token is not
    import hf_curvedit.pipeline.steps as steps

    def broken(*args, **kwargs):
        logging.getLogger("hf_curvedit.test").warning("about to fail with %s", os.environ["HF_TOKEN"])
        raise RuntimeError(f"internal failure near {os.environ['HF_TOKEN']}")

    monkeypatch.setattr(steps, "run_fit", broken)
    monkeypatch.setattr("hf_curvedit.cli.commands.run_fit", broken)
    assert main(["--verbose", *fit_args(work, tmp_path / "f")]) == 1
    err = error_of(capsys)
    assert "Traceback (most recent call last)" in err and "internal failure near" in err
    assert "about to fail with" in caplog.text


def test_secrets_given_as_flags_are_never_echoed(work, tmp_path, capsys, hub):
    from hub_server import DROP

    hub.fail("POST", r"/commit/", DROP)
    args = ["publish", "--adapter", str(work / "edits" / "rho0.6"), "--repo-id", "user/dies3", "--out-dir",
            str(tmp_path / "pub"), "--token", PLANTED_PLAIN]
    assert main(args) == 1
    assert "cannot publish user/dies3" in error_of(capsys)


# ------------------------------------------------------------------------ every writer holds its folder's lock first
@slow
def test_the_eigen_cache_and_the_ekfac_pass_write_only_under_the_folders_lock(work, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_curvedit import fit_eigen_correction

    factors = copy(work / "factors", tmp_path / "factors")
    (factors / "eigen.safetensors").unlink()
    holder = _holder(factors)  # e.g. a fit still writing into the factors' folder
    try:
        # an edit decomposes the factors and caches the bases in their folder
        assert main(["edit", "--model", str(work / "model"), "--factors", str(factors), "--keep-mass", "0.6",
                     "--output-dir", str(tmp_path / "edits")]) == 2
        assert f"{factors} is in use: process {holder.pid}" in error_of(capsys)
        assert not (factors / "eigen.safetensors").exists(), "nothing written into a folder another process holds"
        with pytest.raises(FolderInUseError):
            fit_eigen_correction(AutoModelForCausalLM.from_pretrained(work / "model"), str(work / "corpus.txt"),
                                 factors, tokenizer=byte_tokenizer(), progress=False)
        assert sorted(p.name for p in factors.iterdir()) == ["factors.safetensors"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(["edit", "--model", str(work / "model"), "--factors", str(factors), "--keep-mass", "0.6",
                 "--output-dir", str(tmp_path / "edits")]) == 0
    assert (factors / "eigen.safetensors").is_file()


# ------------------------------------------------------------------------------- messages for the reader, exit codes
def test_fixes_read_as_commands_on_the_command_line_and_as_calls_in_python(work, tmp_path, capsys):
    from hf_curvedit import load_factors
    from hf_curvedit.integrity import DamagedFileError

    factors = copy(work / "factors", tmp_path / "factors")
    truncate(factors / "factors.safetensors")
    assert main(["edit", "--model", str(work / "model"), "--factors", str(factors), "--keep-mass", "0.6",
                 "--output-dir", str(tmp_path / "e")]) == 2
    err = error_of(capsys)
    assert "hf-curvedit fit --restart with the same --output-dir" in err and "fit_factors" not in err, err
    assert err.count("(") == err.count(")"), "every parenthesis closed"
    with pytest.raises(DamagedFileError) as caught:
        load_factors(factors)
    assert "fit_factors(..., resume=False)" in str(caught.value) and "--restart" not in str(caught.value)
    assert str(caught.value).count("(") == str(caught.value).count(")")
    # EK-FAC selection without corrected eigenvalues
    assert main(["edit", "--model", str(work / "model"), "--factors", str(work / "factors"), "--keep-mass", "0.6",
                 "--selection", "ekfac_mass", "--output-dir", str(tmp_path / "e2")]) == 2
    err = error_of(capsys)
    assert "hf-curvedit fit --ekfac" in err and "fit_eigen_correction(" not in err, err


def test_a_failed_push_prints_a_retry_command_with_its_revision_and_pr_flag(work, tmp_path, capsys, hub):
    import shlex

    from hub_server import DROP

    hub.fail("POST", r"/commit/", DROP)
    out = tmp_path / "pub dir"  # a space in the path: the command must still paste
    assert main(["publish", "--adapter", str(work / "edits" / "rho0.6"), "--repo-id", "user/retry", "--out-dir",
                 str(out), "--revision", "dev", "--create-pr"]) == 1
    err = error_of(capsys)
    command = next(line for line in err.split("`") if line.startswith("hf upload"))
    assert shlex.split(command) == ["hf", "upload", "user/retry", str(out), "--repo-type", "model", "--revision",
                                    "dev", "--create-pr"]
    assert "push_folder" not in err


def test_exit_2_is_for_bad_input_and_a_bug_keeps_its_traceback(work, tmp_path, capsys, monkeypatch):
    assert main(edit_args(work, tmp_path / "edits", "1.5")) == 2
    err = error_of(capsys)
    assert "Traceback" not in err and "--keep-mass 1.5" in err
    import hf_curvedit.selection as selection

    def bug(*args, **kwargs):  # a ValueError nobody raised on purpose: an internal bug, not bad input
        return int("not a number")

    monkeypatch.setattr(selection, "curvature_mass_cutoffs", bug)
    assert main(edit_args(work, tmp_path / "edits2")) == 1
    err = error_of(capsys)
    assert "Traceback (most recent call last)" in err and "invalid literal for int()" in err
    assert "hf-curvedit edit: failed: ValueError" in err.splitlines()[-1]


def test_the_heap_is_trimmed_only_for_a_pass_on_the_cpu(work, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_curvedit import FactorConfig, utils
    from hf_curvedit.curvature import collector
    from hf_curvedit.utils import heap_trim_helps

    assert heap_trim_helps(torch.device("cpu")) == (utils._malloc_trim() is not None)  # glibc only
    assert not heap_trim_helps(torch.device("cuda", 0)) and not heap_trim_helps(torch.device("mps"))
    calls = []
    monkeypatch.setattr(collector, "release_free_memory", lambda: calls.append(1))
    monkeypatch.setattr(collector, "heap_trim_helps", lambda device: device.type == "cuda")  # as if on a GPU
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    batches = [(0, {"input_ids": torch.randint(1, 200, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)})]
    collector.collect_factor_sums(model, batches, ["model.layers.0.mlp.up_proj"], FactorConfig())
    assert calls == [], "no process-wide trim where it cannot help"
