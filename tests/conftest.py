"""Shared pytest fixtures (keep this small and generic)."""

import os
import random

# Triton kernels run under the interpreter on the CPU. It must be chosen before triton is first
# imported (sparsec's custom ops import it through torch.library.triton_op), so it is set here.
# SPARSEC_TEST_GPU=1 runs the same tests compiled for a real GPU.
if os.environ.get("SPARSEC_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def seeded():
    """Seed torch and random; returns the seed. Tests that draw random weights or inputs use it."""
    seed = 1234
    torch.manual_seed(seed)
    random.seed(seed)
    return seed



@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo cache before and after the test (torch.compile tests must not share graphs)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
