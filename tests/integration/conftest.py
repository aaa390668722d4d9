import asyncio

import pytest
from openai import AsyncOpenAI
from parley import config

from tests.fakes.llamacpp import InstrumentedLlamaCppEngine
from tests.support.stack import running_stack

MODEL = "SmolLM2-135M-Instruct"
BODY_LIMIT = 1 << 20  # small, so the 413 test stays cheap


@pytest.fixture(scope="session")
async def stack(tmp_path_factory):
    """Real SmolLM2 (llama.cpp) behind the real gRPC server and the real Envoy, on free ports."""
    engine = await asyncio.to_thread(InstrumentedLlamaCppEngine.from_settings, config.load(environ={}))
    async with running_stack(tmp_path_factory.mktemp("stack") / "parley.sqlite3", engine=engine,
                             max_request_body_bytes=BODY_LIMIT) as running:
        yield running


@pytest.fixture(scope="session")
async def client(stack):
    async with AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120) as openai_client:
        yield openai_client
