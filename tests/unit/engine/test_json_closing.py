import json
import random

import pytest
from parley.engine.json_closing import JsonCloser

DOCUMENTS = [
    {},
    {"a": 1},
    {"name": "Ada \"the\" Countess\\", "age": -12.5e3, "tags": ["x", [], {}, True, False, None],
     "nested": {"deep": [{"k": "v"}, 0.25, "\u00e9\n"]}},
    {"unicode": "\u2603 snow", "empty": "", "n": [1, 2, 3], "t": True, "f": False, "z": None},
]


def complete(prefix: str, chunks: int = 1) -> str:
    closer = JsonCloser()
    step = max(1, len(prefix) // chunks)
    for start in range(0, len(prefix), step):
        closer.feed(prefix[start:start + step])
    return prefix + closer.suffix()


@pytest.mark.parametrize("document", DOCUMENTS)
@pytest.mark.parametrize("indent", [None, 2])
def test_every_prefix_of_a_document_completes_to_json(document, indent):
    text = json.dumps(document, indent=indent, ensure_ascii=False)
    escaped = json.dumps(document, indent=indent)  # \\u escapes too
    for source in (text, escaped):
        for end in range(len(source) + 1):
            completed = complete(source[:end], chunks=random.Random(end).randint(1, 4))
            parsed = json.loads(completed)
            assert isinstance(parsed, dict), completed


def test_a_complete_document_needs_nothing_and_an_empty_one_the_smallest_object():
    closer = JsonCloser()
    assert closer.suffix() == "{}"
    closer.feed('{"a": [1, 2]}')
    assert closer.suffix() == ""


def test_the_closing_is_short():
    assert complete('{"a": [1, {"b": "tex') == '{"a": [1, {"b": "tex"}]}'
    assert complete('{"a": tr') == '{"a": true}'
    assert complete('{"a": 1.') == '{"a": 1.0}'
    assert complete('{"a": 1, ') == '{"a": 1, "": null}'
    assert complete('{"key') == '{"key": null}'
