"""Loading what the demo shows: an adapter over its base (`load_demo_model`), the default edit of the embedded model
built on the fly (`default_demo_adapter`), and `launch_demo`, which ``hf-curvedit demo`` calls."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluation.sets import RecitationSet
from .app import build_app, require_gradio

if TYPE_CHECKING:  # pragma: no cover - typing only
    import gradio

__all__ = ["DEFAULT_DEMO_FIT_TOKENS", "DEFAULT_DEMO_KEEP_MASS", "DEFAULT_DEMO_TARGETS", "DemoModel",
           "default_demo_adapter", "launch_demo", "load_demo_model"]

# The grid's pick of `hf-curvedit run examples/default.yaml` on the embedded default (README, "Measured"): layers 2-3,
# gate+up+down, one rho = 0.8 (the job's per-layer search then moves layer 2 to 0.85; the demo shows the simpler edit).
DEFAULT_DEMO_TARGETS = r".*layers\.(2|3)\.mlp\.(gate|up|down)_proj"
DEFAULT_DEMO_KEEP_MASS = 0.8
DEFAULT_DEMO_FIT_TOKENS = 50_000


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

    from .. import tuner  # noqa: F401 - registers the CURVEDIT PEFT method before the adapter is read
    from ..curvature import default_task
    from ..pipeline import UsageError, default_recitation_sets, load_model, recitation_sets

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
    """An edit of the embedded default to show: the main job's grid pick (layers 2-3 gate/up/down, ρ = 0.8), with
    factors fitted on ``max_tokens`` tokens of the stdlib docs (the job uses 200k; fewer keep the first start to a
    few minutes on 2 cores). Built with the pipeline's fit and edit steps into ``work_dir``; reused when there.
    """
    from ..pipeline import EditStep, FitStep, run_edit, run_fit

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
            from ..pipeline import UsageError

            raise UsageError("--base needs --adapter: only an edit of the embedded default is built on the fly")
        adapter = default_demo_adapter(work_dir, fit_tokens)
    loaded = load_demo_model(adapter, base, recitation=recitation, suffix_tokens=suffix_tokens)
    app = build_app(loaded.peft_model, loaded.tokenizer, recitation_set=loaded.recitation_sets, **(app_options or {}))
    app.launch(server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock, **launch_kwargs)
    return app
