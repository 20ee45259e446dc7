"""See the edit: a gradio app that shows base and edited continuations of a prompt side by side.

Both columns come from ONE loaded `PeftModel`: the base column runs inside ``with peft_model.disable_adapter():``,
which is the base model bit for bit, so the demo never holds a second copy of the weights. In each column the
longest contiguous run of tokens shared with a reference text (for a memorized example: its gold suffix) is
highlighted. With a recitation set, a table recites its examples with and without the edit and scores each row with
the package's own recitation metrics (Strict, Levenshtein distance).

    build_app(peft_model, tokenizer, recitation_set=...)     # a gradio.Blocks; .launch() it
    launch_demo(adapter="runs/default/edit/rho0.8-pattern")   # what `hf-curvedit demo` calls

gradio is an optional dependency (``pip install 'hf-curvedit[demo]'``) and is imported only when an app is built.
"""

from .app import DEMO_INSTALL_HINT, build_app, require_gradio
from .compare import MATCH_LABEL, Continuation, EditDemo, GenerationSettings, longest_common_run
from .loading import (
    DEFAULT_DEMO_KEEP_MASS,
    DEFAULT_DEMO_TARGETS,
    DemoModel,
    default_demo_adapter,
    launch_demo,
    load_demo_model,
)

__all__ = ["DEFAULT_DEMO_KEEP_MASS", "DEFAULT_DEMO_TARGETS", "DEMO_INSTALL_HINT", "MATCH_LABEL", "Continuation",
           "DemoModel", "EditDemo", "GenerationSettings", "build_app", "default_demo_adapter", "launch_demo",
           "load_demo_model", "longest_common_run", "require_gradio"]
