"""Fixtures shared by the test modules (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """torch on one thread during the test (the test machine is shared), restored after it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
