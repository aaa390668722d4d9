"""Model-family text formats: tool calls (families.py: one unit per family; harmony.py, gpt-oss's
channels) and reasoning blocks, parsed while they stream (parsing.py) into typed segments
(segments.py)."""

from parley.engine.formats.families import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    TOOL_FORMATS,
    ToolFormat,
    formats_of_template,
    tool_format,
    with_reasoning,
)
from parley.engine.formats.harmony import HARMONY
from parley.engine.formats.parsing import THINK_CLOSE, THINK_OPEN, OutputParser, ThinkParser
from parley.engine.formats.segments import CALL_END, CallArguments, CallEnd, CallStart, Reasoning, Segment, Text

__all__ = [
    "CALL_END", "HARMONY", "HERMES", "LLAMA3_JSON", "MISTRAL", "THINK_CLOSE", "THINK_OPEN", "TOOL_FORMATS", "CallArguments",
    "CallEnd", "CallStart", "OutputParser", "Reasoning", "Segment", "Text", "ThinkParser", "ToolFormat",
    "formats_of_template",
    "tool_format", "with_reasoning",
]
