"""``python -m hf_curvedit.cli``: the ``hf-curvedit`` command."""

import sys

from . import main

sys.exit(main())
