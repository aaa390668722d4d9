import os

import pytest
from parley import log

log.configure(os.environ.get("PARLEY_LOG_FORMAT", "console"), os.environ.get("PARLEY_LOG_LEVEL", "warning"))


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def smollm2_checkpoint_dir(tmp_path_factory):
    """A Hugging Face checkpoint directory (SmolLM2's real tokenizer and chat template, no
    weights) for the TensorRT-LLM engine over its fake."""
    from tests.fakes.checkpoint import smollm2_checkpoint

    return smollm2_checkpoint(tmp_path_factory.mktemp("smollm2-hf"))


@pytest.fixture(scope="session")
def harmony_checkpoint_dir(tmp_path_factory, smollm2_checkpoint_dir):
    """The same checkpoint with Harmony's markers as special tokens and a Harmony template (gpt-oss's
    format; no gpt-oss tokenizer can be fetched here)."""
    from tests.fakes.checkpoint import harmony_checkpoint

    return harmony_checkpoint(tmp_path_factory.mktemp("harmony-hf"), smollm2_checkpoint_dir)


@pytest.fixture(scope="session")
def tools_checkpoint_dir(tmp_path_factory, smollm2_checkpoint_dir):
    """The same checkpoint with a chat template that renders tools itself (Qwen2.5's shape)."""
    from tests.fakes.checkpoint import TOOLS_TEMPLATE, templated_checkpoint

    return templated_checkpoint(tmp_path_factory.mktemp("tools-hf"), smollm2_checkpoint_dir, TOOLS_TEMPLATE)


@pytest.fixture(scope="session")
def thinking_checkpoint_dir(tmp_path_factory, smollm2_checkpoint_dir):
    """... and one whose template can turn thinking off (Qwen3's `enable_thinking`)."""
    from tests.fakes.checkpoint import THINKING_TEMPLATE, templated_checkpoint

    return templated_checkpoint(tmp_path_factory.mktemp("thinking-hf"), smollm2_checkpoint_dir, THINKING_TEMPLATE)
