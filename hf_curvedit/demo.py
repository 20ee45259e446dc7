"""See the edit: a gradio app that shows base and edited continuations of a prompt side by side.

Both columns come from ONE loaded `PeftModel`: the base column runs inside ``with peft_model.disable_adapter():``,
which is the base model bit for bit, so the demo never holds a second copy of the weights. In each column the
longest contiguous run of tokens shared with a reference text (for a memorized example: its gold suffix) is
highlighted. With a recitation set, a table recites its examples with and without the edit and scores each row with
the package's own recitation metrics (Strict, Levenshtein distance).

    build_app(peft_model, tokenizer, recitation_set=...)     # a gradio.Blocks; .launch() it
    launch_demo(adapter="runs/default/edit/rho0.8")           # what `hf-curvedit demo` calls

gradio is an optional dependency (``pip install 'hf-curvedit[demo]'``) and is imported only when an app is built.
"""

from __future__ import annotations

import contextlib
import difflib
import html
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .evaluation.recitation import evaluate_recitation, recitation_scores
from .evaluation.sets import RecitationSet

if TYPE_CHECKING:  # pragma: no cover - typing only
    import gradio

__all__ = ["DEFAULT_DEMO_KEEP_MASS", "DEFAULT_DEMO_TARGETS", "DEMO_INSTALL_HINT", "MATCH_LABEL", "Continuation",
           "DemoModel", "EditDemo", "GenerationSettings", "build_app", "default_demo_adapter", "launch_demo",
           "load_demo_model", "longest_common_run", "require_gradio"]

DEMO_INSTALL_HINT = "pip install 'hf-curvedit[demo]'"
MATCH_LABEL = "longest run shared with the reference"
# The edit `hf-curvedit run examples/default.yaml` picks on the embedded default (README, "Measured"): layers 2-3,
# gate+up+down, rho = 0.8.
DEFAULT_DEMO_TARGETS = r".*layers\.(2|3)\.mlp\.(gate|up|down)_proj"
DEFAULT_DEMO_KEEP_MASS = 0.8
DEFAULT_DEMO_FIT_TOKENS = 50_000


def require_gradio() -> Any:
    """Import gradio, or raise an ImportError that says how to install it."""
    try:
        import gradio
    except ImportError as e:
        raise ImportError(f"the demo app needs gradio, which is not installed: {DEMO_INSTALL_HINT}") from e
    return gradio


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
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, "
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
            raise ValueError("the prompt is empty: type some text")
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


# ------------------------------------------------------------------------------------------------------- the app
TABLE_COLUMNS = ["set", "#", "prefix", "gold suffix", "base", "edited", "base Strict", "edited Strict",
                 "base Lev d/L", "edited Lev d/L"]


def _as_sets(recitation_set: RecitationSet | Mapping[str, RecitationSet] | None) -> dict[str, RecitationSet]:
    if recitation_set is None:
        return {}
    if isinstance(recitation_set, RecitationSet):
        return {"recitation": recitation_set}
    return dict(recitation_set)


def _summary(result: dict[str, Any]) -> str:
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


def build_app(peft_model: Any, tokenizer: Any, *,
              recitation_set: RecitationSet | Mapping[str, RecitationSet] | None = None,
              title: str = "hf-curvedit: base vs edited", description: str | None = None,
              prompt: str | None = None, reference: str | None = None, max_new_tokens: int = 32,
              table_examples: int = 8, add_bos: bool | None = None) -> gradio.Blocks:
    """A gradio app that shows, for a prompt, the base and the edited continuation side by side.

    Args:
        peft_model: a `PeftModel` holding the edit (active adapter). It is shared, never copied: the base column
            runs under ``peft_model.disable_adapter()``.
        tokenizer: the model's tokenizer.
        recitation_set: a [`RecitationSet`] or a mapping name → set: examples to pick as prompts (their gold suffix
            becomes the reference) and to recite in the table.
        title, description: page heading and the text under it.
        prompt, reference: initial prompt and reference text (default: the first example of the recitation set).
        max_new_tokens: initial continuation length.
        table_examples: initial number of examples per set recited by the table.
        add_bos: see [`EditDemo`].

    Returns:
        `gradio.Blocks`, with the API endpoints ``/generate`` and ``/recite``.

    Raises:
        ImportError: gradio is not installed (the message says ``pip install 'hf-curvedit[demo]'``).
    """
    gr = require_gradio()
    demo = EditDemo(peft_model, tokenizer, _as_sets(recitation_set), add_bos=add_bos)
    examples = demo.examples()
    if prompt is None and examples:
        prompt, first_reference = demo.example(examples[0][1])
        reference = first_reference if reference is None else reference

    def generate(prompt_text: str, reference_text: str, max_new: float, do_sample: bool, temperature: float,
                 top_p: float, seed: float) -> tuple[Any, Any, str, dict[str, Any]]:
        try:
            settings = GenerationSettings(int(max_new), bool(do_sample), float(temperature), float(top_p),
                                          int(seed or 0))
            result = demo.compare(prompt_text or "", reference_text or "", settings)
        except ValueError as e:  # bad input: show it in the page instead of a generic "Error"
            raise gr.Error(str(e)) from e
        details = {"prompt_ids": result["prompt_ids"], "reference_ids": result["reference_ids"],
                   "base": result["base"].to_dict(), "edited": result["edited"].to_dict()}
        prompt_ids = result["prompt_ids"]
        return (demo.render(result["base"], prompt_ids), demo.render(result["edited"], prompt_ids),
                _summary(result), details)

    def pick(key: str | None) -> tuple[str, str]:
        return demo.example(key) if key else (gr.skip(), gr.skip())

    def cell(row: dict[str, Any], column: str) -> Any:
        if "Strict" in column:
            return "yes" if row[column] else "no"
        if column == "prefix" and len(row[column]) > 48:  # its end is what the suffix continues
            return "…" + row[column][-48:]
        return row[column]

    def recite(per_set: float) -> list[list[Any]]:
        return [[cell(r, c) for c in TABLE_COLUMNS] for r in demo.recite(int(per_set))]

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\n\n" + (description or (
            "The same model with its curvature edit **off** (base) and **on** (edited). Both columns come from one "
            "loaded PeftModel; the base runs with the adapter disabled. Highlighted: the longest run of tokens "
            "shared with the reference text.")))
        with gr.Row():
            with gr.Column(scale=3):
                prompt_box = gr.Textbox(value=prompt or "", label="Prompt", lines=3, elem_id="prompt")
                reference_box = gr.Textbox(value=reference or "", label="Reference (e.g. the memorized continuation)",
                                           lines=2, elem_id="reference")
            with gr.Column(scale=2):
                picker = gr.Dropdown(choices=examples, value=None, label="Pick a recitation set example",
                                     visible=bool(examples), elem_id="picker")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(1, 256, value=max_new_tokens, step=1, label="max new tokens")
                    do_sample = gr.Checkbox(value=False, label="sample (off: greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top p")
                    seed = gr.Number(value=0, precision=0, label="seed (sampling is reproducible)")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row(equal_height=True):
            with gr.Column(variant="panel"):
                gr.Markdown("### Base (adapter disabled)")
                base_out = gr.HTML(elem_id="base-output")
            with gr.Column(variant="panel"):
                gr.Markdown("### Edited")
                edited_out = gr.HTML(elem_id="edited-output")
        gr.Markdown('<mark style="background:#fcd34d">highlighted</mark>: ' + MATCH_LABEL + "; grey: the prompt.")
        summary = gr.Markdown(elem_id="summary")
        with gr.Accordion("Token ids", open=False):  # exact ids: a decoded byte-level text can hide differences
            details = gr.JSON(label="prompt, reference and continuation token ids", elem_id="details")
        inputs = [prompt_box, reference_box, max_new, do_sample, temperature, top_p, seed]
        outputs = [base_out, edited_out, summary, details]
        run.click(generate, inputs, outputs, api_name="generate")
        prompt_box.submit(generate, inputs, outputs, api_visibility="private")
        picker.change(pick, [picker], [prompt_box, reference_box], api_visibility="private")
        if prompt:  # the page opens on a comparison, not on empty columns
            app.load(generate, inputs, outputs, api_visibility="private")
        if examples:
            gr.Markdown("## Recitation set\nGreedy continuation of each prefix for the length of its gold suffix; "
                        "Strict = recited exactly, Lev d/L = token-level Levenshtein distance over the suffix length "
                        "(higher = recites less).")
            with gr.Row():
                largest = max(len(s) for s in demo.recitation_sets.values())
                per_set = gr.Slider(1, largest, value=min(table_examples, largest), step=1, label="examples per set")
                recite_btn = gr.Button("Recite", elem_id="recite")
            table = gr.Dataframe(headers=TABLE_COLUMNS, interactive=False, wrap=True, elem_id="recitation-table",
                                 column_widths=["8%", "4%", "20%", "14%", "14%", "14%", "6%", "6%", "7%", "7%"])
            recite_btn.click(recite, [per_set], [table], api_name="recite")
    return app


# ------------------------------------------------------------------------------------------------ loading + launch
@dataclass
class DemoModel:
    """What the demo runs on: the edited `PeftModel` (one copy), its tokenizer and the recitation sets."""

    peft_model: Any
    tokenizer: Any
    recitation_sets: dict[str, RecitationSet] = field(default_factory=dict)


def load_demo_model(adapter: str | Path, base: str | None = None, *, revision: str | None = None,
                    recitation: Mapping[str, str | Path] | None = None, suffix_tokens: int = 8,
                    dtype: str = "float32") -> DemoModel:
    """Load ``base`` (a model id or folder; ``None``: the embedded default) and the adapter on it with
    `PeftModel.from_pretrained`, as ``hf-curvedit evaluate`` does.

    Args:
        adapter: adapter folder or Hub repo id.
        revision: the adapter's revision on the Hub.
        recitation: NAME → PATH of recitation sets (see ``hf-curvedit evaluate --recitation``); without any, the
            embedded default's memorized set when ``base`` is ``None``.
    """
    from peft import PeftModel

    from . import tuner  # noqa: F401 - registers the CURVEDIT PEFT method before the adapter is read
    from .curvature import default_task
    from .pipeline import UsageError, default_recitation_sets, load_model, recitation_sets

    net, tok = load_model(base, dtype)
    if default_task(net).name != "causal-lm":
        raise UsageError("the demo shows text continuations; this base model is not a causal language model")
    peft_model = PeftModel.from_pretrained(net, str(adapter), revision=revision).eval()
    sets = recitation_sets(recitation or {}, tok, suffix_tokens)
    if not sets and base is None:
        with contextlib.suppress(UsageError):  # an embedded default without a memorized set: no table
            sets = default_recitation_sets(tok)
    return DemoModel(peft_model, tok, sets)


def default_demo_adapter(work_dir: str | Path = "runs/demo", max_tokens: int = DEFAULT_DEMO_FIT_TOKENS) -> Path:
    """An edit of the embedded default to show: the one the main job picks (layers 2-3 gate/up/down, ρ = 0.8), with
    factors fitted on ``max_tokens`` tokens of the stdlib docs (the job uses 200k; fewer keep the first start to a
    few minutes on 2 cores). Built with the pipeline's fit and edit steps into ``work_dir``; reused when there.
    """
    from .pipeline import EditStep, FitStep, run_edit, run_fit

    work = Path(work_dir)
    adapter = work / "edit" / f"rho{DEFAULT_DEMO_KEEP_MASS:g}"
    if (adapter / "adapter_config.json").exists():
        return adapter
    run_fit(None, FitStep(max_tokens=max_tokens, target_modules=DEFAULT_DEMO_TARGETS), work / "factors")
    run_edit(None, work / "factors", EditStep(keep_mass=(DEFAULT_DEMO_KEEP_MASS,), target_modules=DEFAULT_DEMO_TARGETS),
             work / "edit")
    return adapter


def launch_demo(adapter: str | Path | None = None, base: str | None = None, *, host: str = "127.0.0.1",
                port: int | None = None, work_dir: str | Path = "runs/demo",
                fit_tokens: int = DEFAULT_DEMO_FIT_TOKENS, recitation: Mapping[str, str | Path] | None = None,
                suffix_tokens: int = 8, app_options: Mapping[str, Any] | None = None,
                prevent_thread_lock: bool = False, **launch_kwargs: Any) -> gradio.Blocks:
    """Load an adapter over its base and serve the app on ``host:port`` (``hf-curvedit demo``).

    Without ``adapter`` (and without ``base``) an edit of the embedded default is built first (see
    [`default_demo_adapter`]). ``app_options`` go to [`build_app`], ``launch_kwargs`` to ``Blocks.launch``. Blocks
    until interrupted unless ``prevent_thread_lock``; returns the app.
    """
    require_gradio()  # fail before a factor fit, not after
    if adapter is None:
        if base is not None:
            from .pipeline import UsageError

            raise UsageError("--base needs --adapter: only an edit of the embedded default is built on the fly")
        adapter = default_demo_adapter(work_dir, fit_tokens)
    loaded = load_demo_model(adapter, base, recitation=recitation, suffix_tokens=suffix_tokens)
    app = build_app(loaded.peft_model, loaded.tokenizer, recitation_set=loaded.recitation_sets, **(app_options or {}))
    app.launch(server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock, **launch_kwargs)
    return app
