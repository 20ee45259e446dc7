"""The ``hf-curvedit`` command.

    hf-curvedit fit   [--model M] [--data D] --output-dir runs/default
    hf-curvedit edit  --factors runs/default --keep-mass 0.6 [0.8 ...] --output-dir runs/default/edits
    hf-curvedit evaluate --adapter runs/default/edits/rho0.6 --recitation quotes=quotes.txt --output report.json
    hf-curvedit publish  --adapter runs/default/edits/rho0.6 --repo-id user/name --out-dir publish/ [--dry-run]
    hf-curvedit run examples/default.yaml     # fit → sweep → edit → evaluate → publish, resuming finished steps
    hf-curvedit plan --model allenai/OLMo-2-1124-7B --max-factor-memory-gb 40   # memory and passes, no weights
    hf-curvedit demo [--adapter runs/default/edit/rho0.8]   # base vs edited side by side in the browser (gradio)

Without ``--model`` the embedded default (a small byte-level Llama) is used; without ``--data``
the factors come from the documentation of Python's standard library.
Exit codes: 0 success, 1 a run-time failure, 2 bad arguments or input.

The package: `parser` (one function per subcommand), `commands` (each builds its step settings from the flags and
calls the step function that `hf-curvedit run` calls too), and `main` here (exit codes, messages that name flags).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence

from ..integrity import FolderInUseError
from ..pipeline import UsageError
from .commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, _step  # noqa: F401  (_step: tests build steps from flags)
from .parser import build_parser

logger = logging.getLogger("hf_curvedit")

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "UsageError", "as_flags", "build_parser", "main"]


# What library messages call Python arguments, as the flags and commands of the command line. A message raised deep in
# the library names the argument of its own function; the user of the command typed a flag.
_AS_FLAGS = [
    (re.compile(r"\(?\bfit_factors\(\.\.\., resume=False\)\)?"), "--restart"),
    (re.compile(r"\bpass resume=False\b"), "pass --restart"),
    (re.compile(r"\bresume=False\b"), "--restart"),
    (re.compile(r"\boverwrite=True \(--overwrite\)"), "--overwrite"),
    (re.compile(r"\boverwrite=True\b"), "--overwrite"),
    (re.compile(r"\bHubOptions\(token=([^)]*)\)"), r"--token \1"),
    (re.compile(r"\bpush_folder\('([^']*)', '([^']*)'\)"), r"`hf upload \2 \1 --repo-type model`"),
    (re.compile(r"\bpush_space\('([^']*)', '([^']*)'\)"), r"`hf upload \2 \1 --repo-type space`"),
]


def as_flags(message: str) -> str:
    """A library message with the Python arguments it names replaced by the command line's flags."""
    for pattern, flag in _AS_FLAGS:
        message = pattern.sub(flag, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, ValueError, KeyError, FileNotFoundError, FileExistsError, FolderInUseError) as e:
        print(f"hf-curvedit {args.command}: error: {as_flags(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command reports every failure with its exit code
        logger.debug("failure", exc_info=True)
        print(f"hf-curvedit {args.command}: failed: {type(e).__name__}: {as_flags(str(e))}", file=sys.stderr)
        return EXIT_FAILURE
