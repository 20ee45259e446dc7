"""The demo app: the gradio layout over `EditDemo` (gradio is imported only when an app is built)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..evaluation.sets import RecitationSet
from .compare import MATCH_LABEL, TABLE_COLUMNS, EditDemo, GenerationSettings, as_recitation_sets, comparison_summary

if TYPE_CHECKING:  # pragma: no cover - typing only
    import gradio

__all__ = ["DEMO_INSTALL_HINT", "build_app", "require_gradio"]

DEMO_INSTALL_HINT = "pip install 'hf-curvedit[demo]'"


def require_gradio() -> Any:
    """Import gradio, or raise an ImportError that says how to install it."""
    try:
        import gradio
    except ImportError as e:
        raise ImportError(f"the demo app needs gradio, which is not installed: {DEMO_INSTALL_HINT}") from e
    return gradio


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
    demo = EditDemo(peft_model, tokenizer, as_recitation_sets(recitation_set), add_bos=add_bos)
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
                comparison_summary(result), details)

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
