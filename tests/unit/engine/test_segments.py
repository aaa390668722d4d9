"""A prompt rendered message by message is the prompt rendered whole: checked on the real
templates and tokenizers (SmolLM2's GGUF through llama.cpp, its Hugging Face checkpoint through
the TensorRT-LLM engine), and templates that do not write each message on its own are refused."""

import asyncio
import random

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from parley import config
from parley.engine.base import ChatMessage
from parley.engine.llamacpp import LlamaCppEngine, default_model_path
from parley.engine.segments import TemplateSegments
from parley.engine.trtllm import TensorRTLLMEngine

from tests.fakes import tensorrt_llm as fake

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Mistral's older templates: the system prompt goes into the last user message.
SYSTEM_IN_LAST_USER = (
    "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join %}"
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}{% if m.role == 'user' %}<|im_start|>[INST] "
    "{% if loop.index0 == ns.last and system %}{{ system }}\n\n{% endif %}{{ m.content }} [/INST]"
    "{% elif m.role == 'assistant' %}<|im_start|>{{ m.content }}</s>{% endif %}{% endfor %}")
# Qwen3's way: reasoning is dropped from assistant turns before the last user message.
STRIPS_EARLIER_REASONING = (
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}{% set c = m.content %}"
    "{% if m.role == 'assistant' and loop.index0 < ns.last and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{{ '<|im_start|>' + m.role + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2}


def template_of(source):
    template = ImmutableSandboxedEnvironment().from_string(source)

    def render(messages, generation):
        chat = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        return template.render(messages=chat, add_generation_prompt=generation)
    return render


def tokenize(text: str) -> list[int]:
    """Special tokens whole, every other character its own token."""
    tokens, at = [], 0
    while at < len(text):
        special = next((s for s in SPECIAL if text.startswith(s, at)), None)
        tokens.append(SPECIAL[special] if special else 1000 + ord(text[at]))
        at += len(special) if special else 1
    return tokens


def test_a_chatml_template_renders_message_by_message():
    segments, why_not = TemplateSegments.checked(template_of(CHATML), tokenize, lambda token: token in (1, 2))
    assert why_not is None
    messages = [ChatMessage("user", "hi"), ChatMessage("assistant", "yo")]
    assert segments.render_message(messages[1], False) == tokenize("<|im_start|>assistant\nyo<|im_end|>\n")
    assert segments.generation_prompt() == tokenize("<|im_start|>assistant\n")


@pytest.mark.parametrize("source, reason", [
    (SYSTEM_IN_LAST_USER, "otherwise than its messages"),
    (STRIPS_EARLIER_REASONING, "otherwise than its messages"),
    (CHATML, "does not open with a special token"),  # the tokenizer's boundary tokens are not these
])
def test_a_template_that_does_not_write_each_message_on_its_own_is_rendered_whole(source, reason):
    boundary = (lambda token: False) if source == CHATML else (lambda token: token in (1, 2))
    segments, why_not = TemplateSegments.checked(template_of(source), tokenize, boundary)
    assert segments is None and reason in why_not


def conversations(count: int, seed: int = 7):
    """Conversations of every shape the service makes: roles in any order, tool calls and
    results as text, reasoning, empty and odd contents."""
    rng = random.Random(seed)
    contents = ["Hello", "", "  two  spaces ", "line\n\nbreaks\n", "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n"
                "</tool_call>", "<tool_response>\n42\n</tool_response>", "<think>\nhm\n</think>\nok", "émoji 🎉",
                "{{ braces }} {% raw %}", "<|im_end|> in text"]
    for _ in range(count):
        yield [ChatMessage(rng.choice(["user", "assistant", "developer"]), rng.choice(contents))
               for _ in range(rng.randint(1, 8))]


def composed(rendering, messages):
    return [token for index, message in enumerate(messages)
            for token in rendering.render_message(message, index == 0)] + rendering.generation_prompt()


def test_smollm2_through_llamacpp_renders_message_by_message_exactly():
    engine = LlamaCppEngine(default_model_path(), "SmolLM2", context_window=512, threads=1, sequences=1)
    try:
        assert engine.message_rendering is not None
        for messages in conversations(60):
            assert composed(engine.message_rendering, messages) == engine.render_prompt(messages), messages
    finally:
        asyncio.run(engine.close())


def test_the_hugging_face_checkpoint_through_tensorrt_llm_renders_message_by_message_exactly(smollm2_checkpoint_dir):
    settings = config.load(environ={}, engine="tensorrt_llm", model_path=str(smollm2_checkpoint_dir),
                           context_window=4096)
    engine = TensorRTLLMEngine.from_settings(settings, api=fake.install_api())
    assert engine.message_rendering is not None
    for messages in conversations(60, seed=11):
        assert composed(engine.message_rendering, messages) == engine.render_prompt(messages), messages
