"""What every benchmark prints first: when, where, and the command that reproduces it."""

from __future__ import annotations

import datetime
import os
import platform


def header(argv: list[str]) -> str:
    """One line: date, machine, cores, torch version and threads, the command."""
    import torch

    return (f"{datetime.datetime.now().isoformat(timespec='seconds')} | {platform.platform()} | "
            f"{os.cpu_count()} cores | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"command: python {' '.join(argv)}")
