import os

import pytest
from parley import log

log.configure(os.environ.get("PARLEY_LOG_FORMAT", "console"), os.environ.get("PARLEY_LOG_LEVEL", "warning"))


@pytest.fixture
def anyio_backend():
    return "asyncio"
