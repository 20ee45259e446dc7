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
  ``--passage-repeats`` times (default 110).
* **Canaries** -- ``--n-canaries`` (default 32) sentences with a fake secret at the end (API key,
  password, phone number, PIN, IBAN-like account, recovery code), generated from templates with a
  seeded ``random.Random``; each is seen ``--canary-repeats`` times (default 150).

* **Skills** -- four kinds of capability, each with held-out items that a local lm-evaluation-harness task scores
  (``hf_curvedit/lm_eval_tasks``, tag ``curvedit_skills``); the formats are short and regular so that a model this
  small learns them:

  - *arithmetic*: ``--arithmetic-train`` (80,000) lines such as ``37+48=85`` or ``91-26=65`` (two-digit operands,
    non-negative differences); ``--arithmetic-test`` (500) problems are split off first and never trained on. Scored
    by greedy generation, exact match. A generalized skill.
  - *closed-book facts*: ``--n-facts`` (120) invented facts, each trained ``--fact-repeats`` (80) times as
    ``Q: What is the capital of Veltria? A: Morun.``; tested by the same question without context, as a
    four-way choice among the facts' answers (chance 25%). The middle ground between memorization and skill.
  - *open-book reading*: ``--openbook-train`` (14,000) passages of one or two facts about random names, then a
    question about one of them (``The capital of Dorvan is Kelth. ... Q: What is the capital of Dorvan? A:
    Kelth.``); 500 fresh passages are tested as a four-way choice, as in OpenBookQA: the passage's names (in a
    two-fact passage, the other one is a wrong choice) and answers of other passages (chance 25%). The answer is
    copied from context. ``--copy-train`` (25,000) copying drills (``velo brita | velo brita``) supply the copied
    bytes that the copy circuit needs to form; the passages alone hold too few.
  - *logic*: ``--logic-train`` (15,000) yes/no questions about comparisons of two-digit numbers (half of them two
    comparisons joined by and/or)
    (``Q: Is 48 > 37 and 15 < 9? A: no.``); 500 unseen expressions, half true, are tested as a two-way choice
    (chance 50%).

The learning rate is a trade-off (README, "What the edit costs"): with the copying drills in the mix, copying from
context forms at a peak of 1e-3 (``--lr``, decaying to ``--min-lr-ratio`` 0.3 of it) and not at 3e-3, while
arithmetic reached 0.82 exact (40 held-out problems) at 3e-3 and reaches 0.17 at 1e-3. The default takes 1e-3, so
that all four skills are above chance. (The previous default, 3e-3 decaying to 0.1 of it, without drills, 100k sums,
30k logic lines and the memorized set seen 150/200 times, reached 0.84.) Knobs for further experiments:
``--attn-lr`` / ``--mlp-lr`` (peak rates of the attention and MLP weights), ``--openbook-relation mayor`` (open-book
questions in a form no closed-book fact uses) and ``--monitor-every N`` (greedy exact match on 40 held-out
arithmetic, open-book and copy items every N steps).

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
* ``training_info.json`` -- the recipe, the loss curve summary, the time it took, library versions;
* in ``--tasks-out`` (default ``hf_curvedit/lm_eval_tasks``): ``<task>/test.jsonl``, the held-out skill items.

Deterministic: fixed seeds, ``torch.set_num_threads(--threads)``,
``torch.use_deterministic_algorithms(True)``; the same Python/torch versions give the same bytes.

Usage::

    python scripts/train_default_model.py            # ~17 min on 2 idle CPU cores (1666 steps, 6.8M tokens)
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
    LM_EVAL_TASKS_DIR,
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


# --- Skills: four kinds of held-out capability, each scored by a local lm-eval task (hf_curvedit/lm_eval_tasks) ---
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zel", "dor", "bri", "sha", "quin", "mor", "tel", "vax", "ul",
             "en", "ar", "is", "om", "pe", "gra", "fen", "sol", "thu", "wy", "xi", "ber", "cal", "dru")


def _name(rng: random.Random, taken: set[str]) -> str:
    """A fresh pronounceable proper name (2-3 syllables) not in ``taken``; adds it there."""
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken and 4 <= len(name) <= 9:
            taken.add(name)
            return name


def make_arithmetic(n_train: int, n_test: int, seed: int) -> tuple[list[str], list[dict]]:
    """Two-digit sums and differences (``37+48=85``, ``91-26=65``). The test problems are never trained on: the
    problem space is split once, so a correct test answer needs the skill, not a memory of the line."""
    problems = [(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    problems += [(a, "-", b) for a in range(10, 100) for b in range(10, a + 1)]
    rng = random.Random(seed)
    rng.shuffle(problems)
    test, train = problems[:n_test], problems[n_test:]
    value = lambda a, op, b: a + b if op == "+" else a - b  # noqa: E731
    train_docs = [f"{a}{op}{b}={value(a, op, b)}" for a, op, b in (rng.choice(train) for _ in range(n_train))]
    test_items = [{"question": f"{a}{op}{b}=", "answer": str(value(a, op, b))} for a, op, b in test]
    return train_docs, test_items


def make_facts(n_facts: int, seed: int, taken: set[str]) -> list[dict]:
    """``n_facts`` synthetic closed-book facts ("the capital of Veltria is Morun"); each test item asks for one fact
    with three distractors drawn from the other facts' answers."""
    rng = random.Random(seed)
    facts = [{"country": _name(rng, taken), "answer": _name(rng, taken)} for _ in range(n_facts)]
    for f in facts:
        others = rng.sample([g["answer"] for g in facts if g is not f], 3)
        choices = others + [f["answer"]]
        rng.shuffle(choices)
        f.update(question=f"Q: What is the capital of {f['country']}? A:", choices=choices,
                 label=choices.index(f["answer"]))
    return facts


OPENBOOK_RELATIONS = {
    # relation: (statement, question); "capital" shares its question with the closed-book facts.
    "capital": ("The capital of {c} is {t}.", "Q: What is the capital of {c}? A:"),
    "mayor": ("The mayor of {c} is {t}.", "Q: Who is the mayor of {c}? A:"),
}


def make_openbook(n_train: int, n_test: int, seed: int, taken: set[str],
                  relation: str = "capital") -> tuple[list[str], list[dict]]:
    """Reading: one or two facts about random names, then a question about one of them. No name is a closed-book
    name and names repeat only by chance across passages, so the answer can only be copied from the passage.

    A test item is a four-way choice, as in OpenBookQA: the passage's names (the answer and, in a two-fact passage,
    the other one) plus answers of other test passages."""
    rng = random.Random(seed)
    statement, question = OPENBOOK_RELATIONS[relation]

    def item() -> tuple[str, str, list[str], list[str]]:
        used = set(taken)  # distinct within the passage, and never a closed-book name
        pairs = [(_name(rng, used), _name(rng, used)) for _ in range(rng.choice((1, 2)))]
        country, city = rng.choice(pairs)
        passage = " ".join(statement.format(c=c, t=t) for c, t in pairs)
        return f"{passage} {question.format(c=country)}", city, [t for _, t in pairs], [c for c, _ in pairs]

    train_docs = [f"{q} {a}." for q, a, _, _ in (item() for _ in range(n_train))]
    drawn = [item() for _ in range(n_test)]
    # A generator of its own, so that the choices leave the training stream and the test passages unchanged.
    pick = random.Random(f"{seed}-openbook-choices")
    answers = [a for _, a, _, _ in drawn]
    test_items = []
    for q, a, names, countries in drawn:
        pool = {other for other in answers if other not in names and other not in countries}
        if len(pool) < 4 - len(names):
            raise ValueError(f"--openbook-test {n_test} leaves too few other passages' names for 4 choices: use more "
                             "(the default is 500)")
        choices = list(names)
        while len(choices) < 4:
            other = pick.choice(answers)
            if other not in choices and other not in countries:
                choices.append(other)
        pick.shuffle(choices)
        test_items.append({"question": q, "answer": a, "choices": choices, "label": choices.index(a)})
    return train_docs, test_items


def make_copy_drills(n: int, seed: int) -> list[str]:
    """In-context copying drills: two to six made-up words, a bar, the same words again (``velo brita | velo brita``).

    Half of every drill can only be predicted by copying from earlier in the context. The open-book documents alone
    hold too few copied bytes for the copy circuit to form in this training budget; these drills supply them.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
                         for _ in range(rng.randint(2, 6)))
        docs.append(f"{words} | {words}")
    return docs


def make_logic(n_train: int, n_test: int, seed: int) -> tuple[list[str], list[dict]]:
    """Comparisons of two-digit numbers joined by ``and``/``or`` ("Q: Is 48 > 37 and 15 < 9? A: no."), half true.
    Test expressions never occur in training."""
    rng = random.Random(seed)

    def comparison() -> tuple[str, bool]:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        op = rng.choice("<>")
        return f"{a} {op} {b}", (a < b) if op == "<" else (a > b)

    def item() -> tuple[str, bool]:
        (x, vx), form = comparison(), rng.random()
        if form < 0.5:
            return x, vx
        y, vy = comparison()
        return (f"{x} and {y}", vx and vy) if form < 0.75 else (f"{x} or {y}", vx or vy)

    seen: set[str] = set()
    want = {True: n_test // 2, False: n_test - n_test // 2}
    test_items: list[dict] = []
    while len(test_items) < n_test:
        expr, value = item()
        if expr not in seen and want[value] > 0:
            want[value] -= 1
            seen.add(expr)
            test_items.append({"question": f"Q: Is {expr}? A:", "choices": ["yes", "no"], "label": 0 if value else 1})
    train_docs = []
    while len(train_docs) < n_train:
        expr, value = item()
        if expr not in seen:
            train_docs.append(f"Q: Is {expr}? A: {'yes' if value else 'no'}.")
    return train_docs, test_items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--attn-lr", type=float, default=None,
                    help="peak learning rate of the attention projections (default: --lr)")
    ap.add_argument("--mlp-lr", type=float, default=None, help="peak learning rate of the MLP weights (default: --lr)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.3)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--general-epochs", type=int, default=2)
    ap.add_argument("--n-passages", type=int, default=100)
    ap.add_argument("--passage-repeats", type=int, default=110)
    ap.add_argument("--suffix-chars", type=int, default=32)
    ap.add_argument("--n-canaries", type=int, default=32)
    ap.add_argument("--canary-repeats", type=int, default=150)
    ap.add_argument("--arithmetic-train", type=int, default=80_000, help="arithmetic lines trained on")
    ap.add_argument("--arithmetic-test", type=int, default=500, help="held-out arithmetic problems")
    ap.add_argument("--n-facts", type=int, default=120, help="closed-book facts")
    ap.add_argument("--fact-repeats", type=int, default=80)
    ap.add_argument("--openbook-train", type=int, default=14_000)
    ap.add_argument("--openbook-test", type=int, default=500)
    ap.add_argument("--openbook-relation", choices=sorted(OPENBOOK_RELATIONS), default="capital",
                    help="the open-book fact; 'capital' asks the closed-book question about a new name")
    ap.add_argument("--copy-train", type=int, default=25_000,
                    help="in-context copying drills (``a b | a b``): reading needs the copy circuit they form")
    ap.add_argument("--logic-train", type=int, default=15_000)
    ap.add_argument("--logic-test", type=int, default=500)
    ap.add_argument("--tasks-out", type=Path, default=LM_EVAL_TASKS_DIR,
                    help="where the held-out skill items go (one test.jsonl per lm-eval task)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--monitor-every", type=int, default=0,
                    help="every N steps, greedy-score 40 held-out arithmetic, open-book and copy items (0: never)")
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
    taken: set[str] = set()
    arith_train, arith_test = make_arithmetic(args.arithmetic_train, args.arithmetic_test, seed=args.seed + 4)
    facts = make_facts(args.n_facts, seed=args.seed + 5, taken=taken)
    openbook_train, openbook_test = make_openbook(args.openbook_train, args.openbook_test, args.seed + 6, taken,
                                                 relation=args.openbook_relation)
    logic_train, logic_test = make_logic(args.logic_train, args.logic_test, seed=args.seed + 7)
    copy_drills = make_copy_drills(args.copy_train, seed=args.seed + 8)
    skill_docs = arith_train + openbook_train + logic_train + copy_drills
    copy_monitor = [{"question": d.split(" | ")[0] + " |", "answer": d.split(" | ")[0]}
                    for d in make_copy_drills(40 if args.copy_train else 0, seed=args.seed + 9)]
    for f in facts:
        skill_docs += [f"{f['question']} {f['answer']}."] * args.fact_repeats
    skill_tests = {"curvedit_arithmetic": arith_test, "curvedit_closedbook": facts,
                   "curvedit_openbook": openbook_test, "curvedit_logic": logic_test}
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
    occurrences.extend(skill_docs)
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
          f"{len(skill_docs)} skill lines; "
          f"{len(stream)} tokens ({mem_tokens / len(stream):.0%} memorized-set), {n_blocks} blocks, {n_steps} steps; "
          f"held-out {len(heldout)} docs ({sum(map(len, heldout))} chars)", flush=True)

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(default_model_config())
    model.config._name_or_path = "hf-curvedit/default-byte-llama"
    n_params = sum(p.numel() for p in model.parameters())
    # In-context copying forms at a lower learning rate than arithmetic needs in this budget, so attention and MLP
    # weights can each have a peak rate of their own; the schedule's shape is shared.
    peaks = {".self_attn.": args.attn_lr, ".mlp.": args.mlp_lr}
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        peak = next((lr for part, lr in peaks.items() if part in name and lr is not None), args.lr)
        groups.setdefault((peak, args.weight_decay if param.ndim >= 2 else 0.0), []).append(param)
    opt = torch.optim.AdamW([{"params": ps, "peak_lr": peak, "lr": peak, "weight_decay": wd}
                             for (peak, wd), ps in groups.items()], betas=(0.9, 0.95))

    def lr_scale(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        frac = (step - args.warmup_steps) / max(1, n_steps - args.warmup_steps)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    def monitor() -> str:
        """Greedy exact match on 40 held-out arithmetic, open-book and copy items (progress only)."""
        model.eval()
        scores = []
        for name, items in (("arithmetic", arith_test[:40]), ("openbook", openbook_test[:40]),
                            ("copy", copy_monitor)):
            hits = 0
            for item in items:
                ids = torch.tensor([[tok.eos_token_id] + tok(item["question"], add_special_tokens=False)["input_ids"]])
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=len(item["answer"]) + 2, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                text = tok.decode(out[0, ids.shape[1]:]).strip()
                answer = item["answer"]
                hits += text[:len(answer)] == answer and not text[len(answer):len(answer) + 1].isalnum()
            if items:
                scores.append(f"{name} {hits / len(items):.2f}")
        model.train()
        return ", ".join(scores)

    model.train()
    losses: list[float] = []
    t_train = time.time()
    for step in range(n_steps):
        batch = blocks[step * args.batch_size:(step + 1) * args.batch_size]
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * lr_scale(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % args.log_every == 0 or step == n_steps - 1:
            el = time.time() - t_train
            print(f"step {step + 1}/{n_steps} loss {losses[-1]:.4f} lr {args.lr * lr_scale(step):.2e} (--lr) "
                  f"elapsed {el:.0f}s eta {el / (step + 1) * (n_steps - step - 1):.0f}s", flush=True)
        if args.monitor_every and ((step + 1) % args.monitor_every == 0 or step == n_steps - 1):
            print(f"step {step + 1} held-out: {monitor()}", flush=True)
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
    for task, items in skill_tests.items():
        (args.tasks_out / task).mkdir(parents=True, exist_ok=True)
        with open(args.tasks_out / task / "test.jsonl", "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, sort_keys=True) + "\n")
    info = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "tasks_out")},
        "n_params": n_params, "n_tokens": len(stream), "n_steps": n_steps, "n_blocks": n_blocks,
        "memorized_token_fraction": mem_tokens / len(stream),
        "n_skill_lines": {"arithmetic": len(arith_train), "closedbook": len(facts) * args.fact_repeats,
                          "openbook": len(openbook_train), "logic": len(logic_train), "copy": len(copy_drills)},
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
