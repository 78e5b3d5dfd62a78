"""Shared test set-up: every test starts from a clean Dynamo cache and counters."""
import pytest


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles new closures of the same code objects; without a reset they pile up
    # in one Dynamo cache entry and hit recompile_limit (8) after a few tests.
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
