"""Schemathesis hooks for the reliability run: every error Parley or its Envoy answers is
OpenAI-shaped (a JSON content type and {"error": {message, type, param, code}})."""

import schemathesis


@schemathesis.check
def openai_shaped_errors(ctx, response, case):
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/json"), f"error with content type {content_type!r}"
    error = response.json().get("error")
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, \
        f"not OpenAI's error shape: {response.text[:200]}"
    assert isinstance(error["message"], str) and error["message"], "an error without a message"
    return None
