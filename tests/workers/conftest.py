from __future__ import annotations

from collections.abc import Iterator

import pytest

from imgpipe.filters import REGISTRY
from imgpipe.filters.testing import enable_test_filters
from imgpipe.workers.pool import FilterPool
from imgpipe.workers.shm import BufferSet


@pytest.fixture
def test_filters() -> Iterator[None]:
    """``crash`` and ``sleep`` registered in this process for one test, then removed
    (so no other test that walks the registry ever runs ``crash``)."""
    added = [name for name in ("crash", "sleep") if name not in REGISTRY]
    enable_test_filters()
    yield
    for name in added:
        REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def pool() -> Iterator[FilterPool]:
    """One filter process with the test filters, shared by a module's tests."""
    p = FilterPool(1, test_hooks=True)
    yield p
    p.close()


@pytest.fixture
def buffers() -> Iterator[BufferSet]:
    bs = BufferSet(2)
    yield bs
    bs.close()
