"""Shared fixtures: a tiny Llama built from a config (no download), and helpers to run it."""

from __future__ import annotations

import os

import pytest
import torch

from llmdiff.testing import tiny_llama

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 23, 42, 7]])
