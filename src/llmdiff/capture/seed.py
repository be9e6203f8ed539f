"""Make two runs draw the same random numbers."""

from __future__ import annotations

import os
import random

import torch


def seed_all(seed: int = 1234, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch (all devices). With ``deterministic=True`` also ask PyTorch for
    deterministic kernels (warning, not failing, where none exists) and disable cuDNN autotuning."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is optional for seeding
        pass
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
