"""Shared fixtures. Everything seeded; no network; the real bundled model where a test needs a model."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Keep the suite on the CI box's two cores and off any hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # CLI commands record runs in the user's registry (lowbit.runs); not from the test suite
    os.environ.setdefault("LOWBIT_NO_RUNS", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled model (SmolLM2-135M-Instruct), fp32, loaded once per test session."""
    from lowbit.models import load_model
    return load_model("smollm2-135m")
