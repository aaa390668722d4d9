"""truncation=disabled vs auto on the real model, with a small context so prompts stay cheap."""

import openai
import pytest
from openai import AsyncOpenAI

from tests.integration.conftest import MODEL
from tests.support.stack import running_stack

pytestmark = [pytest.mark.integration, pytest.mark.model]

WINDOW = 512


@pytest.fixture(scope="module")
async def small_client(tmp_path_factory):
    async with running_stack(tmp_path_factory.mktemp("small") / "p.sqlite3", context_window=WINDOW) as stack:
        async with AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
            yield client


async def test_context_overflow_disabled_is_a_clear_400(small_client):
    history = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 40} for _ in range(3)]
    history.append({"role": "user", "content": "Say OK."})
    with pytest.raises(openai.BadRequestError) as info:
        await small_client.responses.create(model=MODEL, input=history, max_output_tokens=16)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "input"
    assert str(WINDOW) in info.value.body["message"]


async def test_context_overflow_auto_drops_the_oldest_items(small_client):
    history = [{"role": "user", "content": f"note {i}: " + "lorem ipsum dolor sit amet " * 40} for i in range(3)]
    history.append({"role": "user", "content": "Say OK."})
    response = await small_client.responses.create(model=MODEL, input=history, max_output_tokens=16,
                                                   truncation="auto", temperature=0)
    assert response.status in ("completed", "incomplete") and response.truncation == "auto"
    assert response.usage.input_tokens + 16 <= WINDOW
    # Every input item is still listed: truncation shapes the prompt, not the stored request.
    items = await small_client.responses.input_items.list(response.id)
    assert len(items.data) == 4
