import argparse

import pytest
from parley import config


def test_defaults_validate():
    settings = config.load(environ={})
    assert settings.grpc_port == 50051 and settings.engine == "llamacpp" and not settings.log_prompts


def test_env_then_flags_then_overrides():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--http-port", "9000", "--log-prompts"])
    settings = config.load(args, environ={"PARLEY_HTTP_PORT": "8000", "PARLEY_GRPC_PORT": "7000",
                                          "PARLEY_LOG_FORMAT": "json"}, engine="scripted")
    assert (settings.http_port, settings.grpc_port, settings.log_format) == (9000, 7000, "json")
    assert settings.log_prompts is True and settings.engine == "scripted"


@pytest.mark.parametrize("environ,message", [
    ({"PARLEY_GRPC_PORT": "many"}, "must be an integer"),
    ({"PARLEY_GRPC_PORT": "70000"}, "grpc_port must be 0..65535"),
    ({"PARLEY_ENGINE": "gpu-magic"}, "engine must be"),
    ({"PARLEY_LOG_FORMAT": "xml"}, "log_format"),
    ({"PARLEY_LOG_PROMPTS": "maybe"}, "must be a boolean"),
    ({"PARLEY_MODEL_PATH": "/nonexistent.gguf"}, "is not a file"),
    ({"PARLEY_DEFAULT_MAX_OUTPUT_TOKENS": "8"}, ">= 16"),
    ({"PARLEY_KV_CACHE": "paged"}, "kv_cache must be one of shared, per_sequence"),
])
def test_bad_settings_stop_start_up_with_a_clear_message(environ, message):
    with pytest.raises(ValueError, match=message):
        config.load(environ=environ)


def test_the_readme_table_is_the_generated_one():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert config.markdown_table() in readme, "regenerate it: .venv/bin/python -m parley.config"


def test_the_tensorrt_llm_tool_formats_are_the_families_parley_parses():
    from parley.engine.formats import TOOL_FORMATS

    assert set(config.TRTLLM_TOOL_FORMATS) == {"auto", *TOOL_FORMATS}
