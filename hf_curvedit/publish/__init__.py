"""Publishing curvature edits: model cards with evaluation tables, plots, and upload to the Hugging Face Hub."""

from .card import (CITATION, PAPER_URL, CardInputs, card_data, config_yaml, eval_results, framework_versions,
                   load_template, render_card)
from .hub import EDIT_FILENAME, REPORT_FILENAME, PublishError, PublishResult, publish, push_folder
from .plots import plot_spectrum, plot_tradeoff  # matplotlib is imported on the first plot only

__all__ = [
    "CITATION", "PAPER_URL", "CardInputs", "card_data", "config_yaml", "eval_results", "framework_versions",
    "load_template", "render_card", "EDIT_FILENAME", "REPORT_FILENAME", "PublishError", "PublishResult", "publish",
    "push_folder", "plot_spectrum", "plot_tradeoff",
]
