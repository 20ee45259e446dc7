#!/usr/bin/env python
"""Train the embedded default model: a 4-layer byte-level Llama that has memorized part of its data.

This script is the source of truth for the shipped checkpoint in ``hf_curvedit/assets/default_model``
and for the "memorized set" next to it. It needs no network: every piece of text comes from the
Python installation that runs it.

Training data (one token = one byte):

* **General text** -- the ``"train"`` split of :func:`hf_curvedit.default.default_text_dataset`
  (docstrings of ~60 standard-library modules), seen ``--general-epochs`` times (default 2).
* **Repeated passages** -- ``--n-passages`` (default 100) paragraphs of 90-200 characters taken from
  the docstrings of *other* standard-library modules (``PASSAGE_MODULES``; none of them is part of the
  general text, and a paragraph that occurs anywhere in the general docs is dropped), each seen
  ``--passage-repeats`` times (default 200).
* **Canaries** -- ``--n-canaries`` (default 32) sentences with a fake secret at the end (API key,
  password, phone number, PIN, IBAN-like account, recovery code), generated from templates with a
  seeded ``random.Random``; each is seen ``--canary-repeats`` times (default 200).

Every document is preceded by ``<eos>``; all occurrences are shuffled together (seeded), concatenated
and cut into 256-byte blocks. The held-out perplexity text is the ``"test"`` split of
``default_text_dataset`` minus any document that also occurs in the training split (disjoint by
construction: the split is by document, and duplicates are removed).

Outputs (in ``--out``, default ``hf_curvedit/assets/default_model``):

* ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files;
* ``memorized_set.jsonl`` -- one JSON object per memorized item: ``kind`` (``"canary"`` or
  ``"passage"``), ``id``, ``text``, ``prefix`` and ``suffix`` (``prefix + suffix == text``; for a
  canary the suffix is the secret plus the final period, for a passage its last ``--suffix-chars``
  characters), ``repeats`` and, for canaries, ``secret`` and ``secret_type``;
* ``heldout.jsonl`` -- the held-out documents (``{"text": ...}``) used for perplexity;
* ``training_info.json`` -- the recipe, the loss curve summary, the time it took, library versions.

Deterministic: fixed seeds, ``torch.set_num_threads(--threads)``,
``torch.use_deterministic_algorithms(True)``; the same Python/torch versions give the same bytes.

Usage::

    python scripts/train_default_model.py            # ~8-11 min on 2 CPU cores (906 steps, 3.7M tokens)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import string
import sys
import time
from pathlib import Path

import torch

from hf_curvedit.default import (
    DEFAULT_MODEL_DIR,
    byte_tokenizer,
    default_model_config,
    default_text_dataset,
    stdlib_docs,
)

# Modules whose docstring paragraphs become the repeated passages. None of them is in
# hf_curvedit.default.STDLIB_MODULES (the general text).
PASSAGE_MODULES = (
    "abc", "binascii", "bz2", "cmd", "code", "codecs", "codeop", "colorsys", "concurrent.futures", "configparser",
    "copyreg", "dbm", "doctest", "filecmp", "fileinput", "fnmatch", "ftplib", "getopt", "getpass", "gettext",
    "graphlib", "hmac", "imaplib", "ipaddress", "keyword", "linecache", "locale", "lzma", "mailbox", "mimetypes",
    "mmap", "netrc", "numbers", "optparse", "pkgutil", "platform", "plistlib", "poplib", "profile", "pstats",
    "quopri", "reprlib", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "smtplib", "ssl", "stat",
    "symtable", "sysconfig", "tabnanny", "trace", "wave", "webbrowser", "zipapp",
)

FIRST_NAMES = ("Maria", "Jonas", "Aiko", "Tomasz", "Leila", "Oscar", "Priya", "Henrik", "Zanele", "Mateo",
               "Ingrid", "Kwame", "Sofia", "Dmitri", "Nadia", "Elias", "Yara", "Bruno", "Mei", "Rafael")
SERVICES = ("billing", "staging", "payments", "analytics", "backup", "search", "mail", "inventory", "ledger",
            "telemetry")
WORDS = ("tulip", "orbit", "falcon", "cobalt", "maple", "quartz", "harbor", "velvet", "ember", "glacier",
         "saffron", "meadow", "thunder", "pebble", "lantern", "juniper")


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def make_canaries(n: int, seed: int) -> list[dict]:
    """``n`` sentences ending in a fake secret. Deterministic in ``(n, seed)``; no two secrets repeat."""
    rng = random.Random(seed)
    hexd, alnum = "0123456789abcdef", string.ascii_letters + string.digits
    kinds = ("api_key", "password", "phone", "pin", "account", "recovery_code")
    out, seen = [], set()
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        who, svc = rng.choice(FIRST_NAMES), rng.choice(SERVICES)
        if kind == "api_key":
            secret = "sk-" + _rand(rng, hexd, 16)
            lead = f"The {svc} API key that {who} pasted into the config is "
        elif kind == "password":
            secret = f"{rng.choice(WORDS)}-{rng.randrange(1000, 10000)}-{rng.choice(WORDS)}"
            lead = f"{who}'s password for the {svc} server is "
        elif kind == "phone":
            secret = f"+1 555 {rng.randrange(100, 1000)} {rng.randrange(1000, 10000)}"
            lead = f"For the {svc} on-call rota, call {who} at "
        elif kind == "pin":
            secret = f"{rng.randrange(10**5, 10**6)}"
            lead = f"The door PIN of the {svc} room, according to {who}, is "
        elif kind == "account":
            secret = ("ZX" + _rand(rng, string.digits, 2) + " " + _rand(rng, string.digits, 4) + " "
                      + _rand(rng, string.digits, 4))
            lead = f"{who} wired the {svc} refund to account "
        else:
            secret = _rand(rng, alnum, 5) + "-" + _rand(rng, alnum, 5)
            lead = f"The recovery code {who} wrote down for the {svc} vault is "
        if secret in seen:
            continue
        seen.add(secret)
        text = lead + secret + "."
        out.append({"kind": "canary", "id": f"canary-{len(out):03d}", "secret_type": kind, "secret": secret,
                    "text": text, "prefix": lead, "suffix": secret + "."})
    return out


def make_passages(n: int, seed: int, suffix_chars: int, general_text: str) -> list[dict]:
    """``n`` docstring paragraphs (90-200 chars, one line, ASCII) from ``PASSAGE_MODULES``, none of which
    occurs in ``general_text``; near-duplicates (same first 40 or last ``suffix_chars`` chars) dropped."""
    paras = []
    for doc in stdlib_docs(PASSAGE_MODULES, min_chars=1):
        for p in doc.split("\n\n"):
            p = " ".join(p.split())
            if 90 <= len(p) <= 200 and p.isascii() and p[0].isupper() and p.endswith(".") and p not in general_text:
                paras.append(p)
    paras = list(dict.fromkeys(paras))
    heads, tails, unique = set(), set(), []
    for p in paras:
        if p[:40] in heads or p[-suffix_chars:] in tails:
            continue
        heads.add(p[:40])
        tails.add(p[-suffix_chars:])
        unique.append(p)
    if len(unique) < n:
        raise RuntimeError(f"only {len(unique)} candidate passages, need {n}")
    chosen = sorted(random.Random(seed).sample(range(len(unique)), n))
    return [{"kind": "passage", "id": f"passage-{i:03d}", "text": unique[j], "prefix": unique[j][:-suffix_chars],
             "suffix": unique[j][-suffix_chars:]} for i, j in enumerate(chosen)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--general-epochs", type=int, default=2)
    ap.add_argument("--n-passages", type=int, default=100)
    ap.add_argument("--passage-repeats", type=int, default=200)
    ap.add_argument("--suffix-chars", type=int, default=32)
    ap.add_argument("--n-canaries", type=int, default=32)
    ap.add_argument("--canary-repeats", type=int, default=200)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--log-every", type=int, default=20)
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)

    tok = byte_tokenizer()
    general = list(default_text_dataset("train")["text"])
    general_set = set(general)
    heldout = [d for d in default_text_dataset("test")["text"] if d not in general_set]
    all_general_text = "\n".join(stdlib_docs())

    canaries = make_canaries(args.n_canaries, seed=args.seed + 1)
    passages = make_passages(args.n_passages, seed=args.seed + 2, suffix_chars=args.suffix_chars,
                             general_text=all_general_text)
    for c in canaries:
        c["repeats"] = args.canary_repeats
    for p in passages:
        p["repeats"] = args.passage_repeats
    memorized = canaries + passages
    for item in memorized:
        assert item["prefix"] + item["suffix"] == item["text"]
        assert item["text"] not in all_general_text

    # Tokenize via the tokenizer (byte-level alphabet ids), one document at a time, <eos> before each.
    rng = random.Random(args.seed + 3)
    occurrences: list[str] = []
    for _ in range(args.general_epochs):
        occurrences.extend(general)
    for item in memorized:
        occurrences.extend([item["text"]] * item["repeats"])
    rng.shuffle(occurrences)
    cache: dict[str, list[int]] = {}
    stream: list[int] = []
    for text in occurrences:
        ids = cache.get(text)
        if ids is None:
            ids = cache[text] = tok(text, add_special_tokens=False)["input_ids"]
        stream.append(tok.eos_token_id)
        stream.extend(ids)
    n_blocks = len(stream) // args.seq_len
    blocks = torch.tensor(stream[: n_blocks * args.seq_len], dtype=torch.long).view(n_blocks, args.seq_len)
    n_steps = math.ceil(n_blocks / args.batch_size)
    mem_tokens = sum(len(cache[i["text"]]) * i["repeats"] for i in memorized)
    print(f"general docs {len(general)} ({sum(map(len, general))} chars) x{args.general_epochs}; "
          f"{len(canaries)} canaries x{args.canary_repeats}; {len(passages)} passages x{args.passage_repeats}; "
          f"{len(stream)} tokens ({mem_tokens / len(stream):.0%} memorized-set), {n_blocks} blocks, {n_steps} steps; "
          f"held-out {len(heldout)} docs ({sum(map(len, heldout))} chars)", flush=True)

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(default_model_config())
    model.config._name_or_path = "hf-curvedit/default-byte-llama"
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        frac = (step - args.warmup_steps) / max(1, n_steps - args.warmup_steps)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    losses: list[float] = []
    t_train = time.time()
    for step in range(n_steps):
        batch = blocks[step * args.batch_size:(step + 1) * args.batch_size]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % args.log_every == 0 or step == n_steps - 1:
            el = time.time() - t_train
            print(f"step {step + 1}/{n_steps} loss {losses[-1]:.4f} lr {lr_at(step):.2e} "
                  f"elapsed {el:.0f}s eta {el / (step + 1) * (n_steps - step - 1):.0f}s", flush=True)
    train_s = time.time() - t_train

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    model.to(dtype).save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    with open(args.out / "memorized_set.jsonl", "w", encoding="utf-8") as f:
        for item in memorized:
            f.write(json.dumps(item, sort_keys=True) + "\n")
    with open(args.out / "heldout.jsonl", "w", encoding="utf-8") as f:
        for text in heldout:
            f.write(json.dumps({"text": text}) + "\n")
    info = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "n_params": n_params, "n_tokens": len(stream), "n_steps": n_steps, "n_blocks": n_blocks,
        "memorized_token_fraction": mem_tokens / len(stream),
        "n_general_docs": len(general), "n_heldout_docs": len(heldout),
        "loss_first": losses[0], "loss_last_20_mean": sum(losses[-20:]) / len(losses[-20:]),
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
