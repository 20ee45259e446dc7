"""The ``hf-curvedit`` command.

    hf-curvedit fit   [--model M] [--data D] --output-dir runs/default
    hf-curvedit edit  --factors runs/default --keep-mass 0.6 [0.8 ...] --output-dir runs/default/edits
    hf-curvedit evaluate --adapter runs/default/edits/rho0.6 --recitation quotes=quotes.txt --output report.json
    hf-curvedit publish  --adapter runs/default/edits/rho0.6 --repo-id user/name --out-dir publish/ [--dry-run]
    hf-curvedit run examples/default.yaml     # fit → sweep → edit → evaluate → publish, resuming finished steps
    hf-curvedit plan --model allenai/OLMo-2-1124-7B --max-factor-memory-gb 40   # memory and passes, no weights
    hf-curvedit demo [--adapter runs/default/edit/rho0.8-pattern]  # base vs edited side by side in the browser (gradio)

Without ``--model`` the embedded default (a small byte-level Llama) is used; without ``--data``
the factors come from the documentation of Python's standard library.
Exit codes: 0 success, 1 a run-time failure, 2 bad arguments or input.

The package: `parser` (one function per subcommand), `commands` (each builds its step settings from the flags and
calls the step function that `hf-curvedit run` calls too), and `main` here: exit codes (2 for bad input, 1 for a
failure, with its traceback when it was not foreseen), fixes worded as commands and flags (`hf_curvedit.errors.Fix`),
and no token in any message, traceback or log line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from ..errors import InputError, RedactingFilter, on_command_line, redact, register_secret
from ..integrity import FolderInUseError
from ..pipeline import UsageError
from ..pipeline.settings import with_gguf_file
from .commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, _step  # noqa: F401  (_step: tests build steps from flags)
from .parser import build_parser

logger = logging.getLogger("hf_curvedit")

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main"]


# Run-time failures that explain themselves: their message is the whole story, no traceback.
def _explained_failures() -> tuple[type[BaseException], ...]:
    from ..pipeline import StepFailed
    from ..publish import PublishError

    return PublishError, StepFailed


def _note_secrets(args: argparse.Namespace) -> None:
    # every token this run can know of: the flag, the environment, the stored login
    register_secret(getattr(args, "token", None))
    register_secret(os.environ.get("HF_TOKEN"))
    with contextlib.suppress(Exception):  # no login, or an unreadable token file: nothing to note
        from huggingface_hub import get_token

        register_secret(get_token())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _note_secrets(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    with on_command_line():
        try:
            if getattr(args, "gguf_file", None) and args.command != "run":
                # the steps read a model given as a .gguf file through transformers' GGUF loader
                args.model = with_gguf_file(args.model, args.gguf_file)
            return args.func(args)
        except (InputError, FileNotFoundError, FileExistsError, FolderInUseError) as e:
            print(redact(f"hf-curvedit {args.command}: error: {e}"), file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted; run the same command again to resume", file=sys.stderr)
            return 130
        except _explained_failures() as e:
            print(redact(f"hf-curvedit {args.command}: failed: {e}"), file=sys.stderr)
            return EXIT_FAILURE
        except Exception as e:  # noqa: BLE001 - a failure nobody foresaw: its traceback is what a bug report needs
            print(redact(traceback.format_exc()), file=sys.stderr, end="")
            print(redact(f"hf-curvedit {args.command}: failed: {type(e).__name__}: {e}"), file=sys.stderr)
            return EXIT_FAILURE
