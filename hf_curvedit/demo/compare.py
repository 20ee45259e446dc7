"""The demo's comparison logic, without gradio: base and edited continuations of one `PeftModel` (the base under
``disable_adapter()``), the longest run each shares with a reference, and the recitation table, scored with the
package's own metrics. `EditDemo` is what the app calls and what a test can call directly."""

from __future__ import annotations

import contextlib
import difflib
import html
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..evaluation.recitation import evaluate_recitation, recitation_scores
from ..evaluation.sets import RecitationSet

__all__ = ["MATCH_LABEL", "TABLE_COLUMNS", "Continuation", "EditDemo", "GenerationSettings", "as_recitation_sets",
           "comparison_summary", "longest_common_run"]

MATCH_LABEL = "longest run shared with the reference"


def longest_common_run(tokens: Sequence[int], reference: Sequence[int]) -> tuple[int, int, int]:
    """``(start in tokens, start in reference, length)`` of the longest contiguous run of tokens shared by both.

    difflib's matcher with ``autojunk=False`` returns the exact longest common block (earliest one on ties);
    without that flag it would ignore frequent tokens in sequences of 200+ tokens.
    """
    m = difflib.SequenceMatcher(None, list(tokens), list(reference), autojunk=False).find_longest_match(
        0, len(tokens), 0, len(reference))
    return m.a, m.b, m.size


@dataclass(frozen=True)
class GenerationSettings:
    """How both columns are generated; the same settings (and seed) for base and edited, so they differ by the edit.

    Args:
        max_new_tokens: continuation length (generation stops earlier at the end-of-sequence token).
        do_sample: sample instead of greedy decoding.
        temperature, top_p: sampling settings (top-k is off, so only these two shape the distribution).
        seed: the RNG seed set before each sampled generation, which makes sampling reproducible.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise InputError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, "
                             f"{self.top_p}")


@dataclass
class Continuation:
    """One column: the generated token ids and where they share the longest run with the reference."""

    ids: list[int]
    match_start: int = 0
    match_length: int = 0
    reference_start: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "match_start": self.match_start, "match_length": self.match_length,
                "reference_start": self.reference_start}


class EditDemo:
    """What the app does, without gradio: encode the prompt, generate base and edited continuations from one
    `PeftModel`, find the shared runs, and recite a recitation set. `build_app` wires it to widgets.

    Args:
        peft_model: a `PeftModel` whose active adapter is the edit; it is used as it is, never copied.
        tokenizer: its tokenizer.
        recitation_sets: name → [`RecitationSet`] (token ids), for the example picker and the table.
        add_bos: prepend the BOS token to prompts; ``None``: when the tokenizer has one and did not add it itself
            (the embedded default saw ``<eos>`` before every training document, so its memorized prefixes start
            with it).
    """

    def __init__(self, peft_model: Any, tokenizer: Any, recitation_sets: Mapping[str, RecitationSet] | None = None,
                 add_bos: bool | None = None):
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError(f"the demo compares an edit with its base from one PeftModel; got "
                            f"{type(peft_model).__name__} (load one with PeftModel.from_pretrained(base, adapter))")
        self.model = peft_model.eval()
        self.tokenizer = tokenizer
        self.recitation_sets = dict(recitation_sets or {})
        self.add_bos = add_bos
        # gradio runs events in worker threads; disable_adapter() flips shared state, so one generation at a time
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (with BOS per ``add_bos``)."""
        ids = [int(i) for i in self.tokenizer(text, add_special_tokens=True)["input_ids"]]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        add = self.add_bos if self.add_bos is not None else bos is not None
        if add and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise InputError("the prompt is empty: type some text")
        return ids

    def encode_reference(self, text: str) -> list[int]:
        """Token ids of a reference text: no special tokens, as the continuation it is compared with."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]] if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------------ generation
    @contextlib.contextmanager
    def _adapter(self, edited: bool) -> Iterator[None]:
        with self._lock, (contextlib.nullcontext() if edited else self.model.disable_adapter()):
            yield

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], settings: GenerationSettings, *, edited: bool) -> list[int]:
        """The continuation (new token ids only) of the edited model, or of the base (adapter disabled)."""
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([list(prompt_ids)], device=device)
        kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
                                  "pad_token_id": self._pad_id()}
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        # fork_rng: seeding for reproducible sampling must not reset the caller's global RNG stream
        devices = [device] if device.type == "cuda" else []
        with self._adapter(edited), torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        return [int(i) for i in out[0, input_ids.shape[1]:].tolist()]

    def _pad_id(self) -> int | None:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def compare(self, prompt: str, reference: str, settings: GenerationSettings) -> dict[str, Any]:
        """Base and edited continuations of ``prompt``, each with its longest run shared with ``reference``."""
        prompt_ids = self.encode(prompt)
        ref_ids = self.encode_reference(reference)
        out: dict[str, Any] = {"prompt_ids": prompt_ids, "reference_ids": ref_ids}
        for name, edited in (("base", False), ("edited", True)):
            ids = self.generate(prompt_ids, settings, edited=edited)
            a, b, n = longest_common_run(ids, ref_ids)
            out[name] = Continuation(ids, a, n, b)
        return out

    def segments(self, c: Continuation) -> list[tuple[str, bool]]:
        """``(text, in the shared run)`` spans of a continuation: before the run, the run, after it."""
        start, end = c.match_start, c.match_start + c.match_length
        spans = [(c.ids[:start], False), (c.ids[start:end], True), (c.ids[end:], False)]
        # decode span by span: the token boundaries of the run are the ones the highlight must keep
        return [(text, marked) for ids, marked in spans if ids and (text := self.decode(ids))]

    def render(self, c: Continuation, prompt_ids: Sequence[int], prompt_chars: int = 160) -> str:
        """A continuation as HTML: the end of the prompt greyed, then the continuation with its shared run marked.

        Inline styles rather than app CSS: they render the same in every gradio version and in a Space.
        """
        prompt = self.decode(prompt_ids)
        prompt = ("…" + prompt[-prompt_chars:]) if len(prompt) > prompt_chars else prompt
        parts = [f'<span class="curvedit-prompt" style="color:#9ca3af">{html.escape(prompt)}</span>']
        for text, marked in self.segments(c):
            parts.append(f'<mark class="curvedit-match" title="{MATCH_LABEL}" style="background:#fcd34d;color:#111;'
                         f'padding:0 1px;border-radius:2px">{html.escape(text)}</mark>' if marked
                         else f'<span class="curvedit-new">{html.escape(text)}</span>')
        if not c.ids:
            parts.append('<span class="curvedit-new"><i>(nothing generated)</i></span>')
        return ('<div class="curvedit-output" style="white-space:pre-wrap;font-family:ui-monospace,monospace;'
                f'line-height:1.6;min-height:3em">{"".join(parts)}</div>')

    # ------------------------------------------------------------------------------------------------ recitation set
    def examples(self) -> list[tuple[str, str]]:
        """``(label, key)`` for every example of the recitation sets; ``key`` is ``"set:index"``."""
        out = []
        for name, rs in self.recitation_sets.items():
            for i, prefix in enumerate(rs.prefixes):
                text = " ".join(self.decode(prefix).split())
                out.append((f"{name} #{i}: {text[-60:]}", f"{name}:{i}"))
        return out

    def example(self, key: str) -> tuple[str, str]:
        """``(prompt, reference)`` texts of the example ``"set:index"``."""
        name, _, idx = key.rpartition(":")
        rs = self.recitation_sets[name]
        return self.decode(rs.prefixes[int(idx)]), self.decode(rs.suffixes[int(idx)])

    def recite(self, per_set: int = 8, batch_size: int = 16) -> list[dict[str, Any]]:
        """Greedily recite the first ``per_set`` examples of each set with the adapter off and on.

        One row per example: the prefix, the gold suffix, both continuations, and Strict (exact recitation) and the
        token-level Levenshtein distance ``d/L`` of each, from ``evaluate_recitation`` (the metrics of
        `hf-curvedit evaluate`).
        """
        rows = []
        for name, rs in self.recitation_sets.items():
            n = min(max(int(per_set), 1), len(rs))
            prefixes, suffixes = rs.prefixes[:n], rs.suffixes[:n]
            results = {}
            for column, edited in (("base", False), ("edited", True)):
                with self._adapter(edited):
                    results[column] = evaluate_recitation(self.model, prefixes, suffixes, batch_size=batch_size,
                                                          pad_token_id=self._pad_id(), show_progress=False)
            for i in range(n):
                base, edit = results["base"].examples[i], results["edited"].examples[i]
                rows.append({"set": name, "#": i, "prefix": self.decode(prefixes[i]),
                             "gold suffix": self.decode(suffixes[i]),
                             "base": self.decode(base.prediction or []), "edited": self.decode(edit.prediction or []),
                             "base Strict": base.strict(), "edited Strict": edit.strict(),
                             "base Lev d/L": round(base.normalized, 3), "edited Lev d/L": round(edit.normalized, 3)})
        return rows


TABLE_COLUMNS = ["set", "#", "prefix", "gold suffix", "base", "edited", "base Strict", "edited Strict",
                 "base Lev d/L", "edited Lev d/L"]


def as_recitation_sets(recitation_set: RecitationSet | Mapping[str, RecitationSet] | None) -> dict[str, RecitationSet]:
    if recitation_set is None:
        return {}
    if isinstance(recitation_set, RecitationSet):
        return {"recitation": recitation_set}
    return dict(recitation_set)


def comparison_summary(result: dict[str, Any]) -> str:
    """A markdown table: per column, tokens generated, the longest shared run and Levenshtein d/L to the reference."""
    ref = result["reference_ids"]
    lines = ["| | tokens | longest run shared with the reference | Levenshtein d/L to the reference |",
             "|---|---|---|---|"]
    for name in ("base", "edited"):
        c: Continuation = result[name]
        # the package's recitation metric, on the continuation cut to the reference length as `evaluate` does
        lev = f"{recitation_scores([c.ids[:len(ref)]], [ref]).avg_lev:.3f}" if ref else "–"
        lines.append(f"| {name} | {len(c.ids)} | {c.match_length} of {len(ref)} | {lev} |")
    return "\n".join(lines)
