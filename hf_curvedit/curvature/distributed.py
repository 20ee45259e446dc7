"""The processes of a run: accelerate's process state (one process, or those of a ``torchrun`` / ``accelerate
launch``), shared by every stage that divides its work among them."""

from __future__ import annotations

import torch

__all__ = ["dist_state"]


def dist_state():
    """accelerate's process state (one process, or the processes of a torchrun / accelerate launch)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState only detects a multi-process CPU run (torchrun, debug_launcher) when told it is
    # on CPU; an existing Accelerator/PartialState singleton is reused as is.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)
