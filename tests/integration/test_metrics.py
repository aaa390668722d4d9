"""/metrics: Prometheus text that the Prometheus parser reads, with series that move as requests
are served, and the gauges the Gateway API Inference Extension's endpoint picker reads."""

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import scripted_stack

pytestmark = pytest.mark.integration

MODEL = "scripted"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    async with scripted_stack(tmp_path_factory, "metrics") as running:
        yield running


async def scrape(stack) -> dict[tuple[str, tuple], float]:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{stack.app.metrics_port}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


async def test_series_move_as_requests_are_served(stack):
    before = await scrape(stack)
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused")
    response = await client.responses.create(model=MODEL, input="hi")
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_missing")
    after = await scrape(stack)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("parley_requests_total", rpc="HttpCreateResponseChunked", status="200") == 1
    assert moved("parley_requests_total", rpc="HttpGetResponse", status="404") == 1
    assert moved("parley_responses_total", project="default", status="completed") == 1
    assert moved("parley_output_tokens_total", project="default") == response.usage.output_tokens
    assert moved("parley_input_tokens_total", project="default") == response.usage.input_tokens
    assert moved("parley_time_to_first_token_seconds_count") == 1
    assert moved("parley_response_duration_seconds_count") == 1
    assert moved("parley_store_write_seconds_count") >= 1
    for gauge in ("parley_requests_waiting", "parley_requests_running", "vllm:num_requests_waiting",
                  "vllm:num_requests_running"):
        assert after[(gauge, ())] == 0
    assert after[("parley_engine_healthy", ())] == 1
