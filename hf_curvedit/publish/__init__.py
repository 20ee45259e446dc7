"""Publishing curvature edits: model cards with evaluation tables, plots, and upload to the Hugging Face Hub.

[`publish`] = [`stage_folder`] (weights, ``curvedit_edit.json``, ``edit_report.json``, plots) + [`write_card`]
(``README.md``) + [`push_folder`]. [`CardOptions`] says what the card adds to the edit, [`HubOptions`] how to push.
"""

from .card import (
    CITATION,
    PAPER_URL,
    CardInputs,
    CardOptions,
    card_data,
    config_yaml,
    eval_results,
    framework_versions,
    load_template,
    render_card,
)
from .gguf import export_gguf
from .hub import publish, write_card
from .plots import plot_spectrum, plot_sweep, plot_tradeoff  # matplotlib is imported on the first plot only
from .push import HubOptions, PublishError, PublishResult, push_folder
from .space import publish_space, push_space, write_space
from .stage import EDIT_FILENAME, REPORT_FILENAME, StagedFolder, stage_folder

__all__ = [
    "CITATION", "PAPER_URL", "CardInputs", "CardOptions", "card_data", "config_yaml", "eval_results",
    "framework_versions", "load_template", "render_card", "EDIT_FILENAME", "REPORT_FILENAME", "HubOptions",
    "PublishError", "PublishResult", "StagedFolder", "publish", "push_folder", "stage_folder", "write_card",
    "plot_spectrum", "plot_sweep", "plot_tradeoff", "publish_space", "push_space", "write_space", "export_gguf",
]
