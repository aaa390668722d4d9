"""Engine construction by name; imports are lazy so an unused engine costs nothing."""

from __future__ import annotations

from parley.config import Settings
from parley.engine.base import Engine


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "llamacpp":
        from parley.engine.llamacpp import LlamaCppEngine

        return LlamaCppEngine.from_settings(settings)
    if settings.engine == "tensorrt_llm":
        from parley.engine.trtllm import TensorRTLLMEngine

        return TensorRTLLMEngine.from_settings(settings)
    if settings.engine == "remote":
        from parley.engine.remote import RemoteEngine

        return RemoteEngine.from_settings(settings)
    if settings.engine == "scripted":
        from parley.engine.scripted import ScriptedEngine

        script = ["tok "] * settings.scripted_output_tokens if settings.scripted_output_tokens else None
        return ScriptedEngine(model_id=settings.model_name, context_window=settings.context_window,
                              script=script, delay=settings.scripted_token_delay_ms / 1000)
    if settings.engine == "synthetic":
        from parley.engine.synthetic import SyntheticEngine

        return SyntheticEngine(model_id=settings.model_name, context_window=settings.context_window,
                               output_tokens=settings.synthetic_output_tokens,
                               tokens_per_second=settings.synthetic_tokens_per_second,
                               step_seconds=settings.synthetic_step_ms / 1000)
    raise ValueError(f"unknown engine {settings.engine!r}")
