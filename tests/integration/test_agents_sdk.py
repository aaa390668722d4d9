"""The OpenAI Agents SDK running a one-tool agent against Parley (real model, through Envoy),
over HTTP and over WebSocket mode."""

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    OpenAIResponsesWSModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from tests.integration.conftest import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.model]


def weather_agent(model) -> tuple[Agent, list[str]]:
    """An agent with one tool, and the cities the tool was asked about."""
    set_tracing_disabled(True)  # tracing would upload to OpenAI; nothing leaves this machine
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        cities.append(city)
        return f"It is sunny and 21 degrees Celsius in {city}."

    agent = Agent(
        name="Weather assistant",
        instructions="You answer questions about the weather. Use the get_weather tool.",
        tools=[get_weather], model=model,
        # The first turn must call the tool; the SDK then resets tool_choice to auto for the answer.
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=128),
    )
    return agent, cities


def check_run(result, cities: list[str]) -> list[str]:
    """The run called its tool, then answered; returns its response ids."""
    assert cities, "the agent never called its tool"
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item"
    assert isinstance(result.final_output, str) and result.final_output.strip()
    ids = [response.response_id for response in result.raw_responses]
    assert all(response_id and response_id.startswith("resp_") for response_id in ids)
    return ids


async def test_one_tool_agent_end_to_end(client):
    agent, cities = weather_agent(OpenAIResponsesModel(model=MODEL, openai_client=client))
    check_run(await Runner.run(agent, "What is the weather in Paris?", max_turns=4), cities)


async def test_one_tool_agent_over_websocket_mode(stack, client):
    """The same agent on the SDK's WebSocket model: every turn over one connection through Envoy."""
    opened = stack.app.websocket.open_sessions
    model = OpenAIResponsesWSModel(model=MODEL, openai_client=client)
    agent, cities = weather_agent(model)
    try:
        # Chained by id, as agents over WebSocket mode run: each turn sends only its new items.
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=4, auto_previous_response_id=True)
        assert stack.app.websocket.open_sessions == opened + 1  # one socket held for every turn
    finally:
        await model.close()
    ids = check_run(result, cities)
    assert len(ids) >= 2
    second = await stack.call(stack.app.service.get, "default", ids[1])
    assert second["previous_response_id"] == ids[0]  # the SDK continued by id, with only the tool output
