"""Running a streaming output parser over pieces of a sample, and what it made of it."""

import json

from parley.engine.formats import CallArguments, CallStart, Reasoning, Text


def run(parser, pieces):
    segments = []
    for piece in pieces:
        segments.extend(parser.feed(piece))
    segments.extend(parser.finish())
    return segments


def summarize(segments):
    text, reasoning, calls = "", "", []
    for segment in segments:
        match segment:
            case Text(value):
                text += value
            case Reasoning(value):
                reasoning += value
            case CallStart(name):
                calls.append([name, ""])
            case CallArguments(value):
                calls[-1][1] += value
    return text, reasoning, [(name, json.loads(arguments)) for name, arguments in calls], calls


def splits(sample):
    yield [sample]
    yield list(sample)  # one character at a time
    for cut in range(1, len(sample)):
        yield [sample[:cut], sample[cut:]]
