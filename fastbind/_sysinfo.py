"""Names of the machine for `fastbind info` and the benchmark CSVs."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """Host, CPU model and core count, plus the GPU when one is visible."""
    name = f"{platform.node()} | {cpu_model()} x{os.cpu_count()}"
    try:
        import torch

        if torch.cuda.is_available():
            name += " | " + torch.cuda.get_device_name()
    except ImportError:
        pass
    return name
