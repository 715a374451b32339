"""Parse a server-sent-events body into its `data:` payloads, checking every frame is whole."""

from __future__ import annotations

import json


def sse_payloads(body: str) -> list:
    """JSON payloads of each event, with the literal "[DONE]" kept as a string; frames must be complete."""
    assert body.endswith("\n\n"), f"stream does not end on a frame boundary: {body[-80:]!r}"
    payloads = []
    for frame in body.split("\n\n")[:-1]:
        assert frame.startswith("data: "), f"not a data frame: {frame!r}"
        data = frame[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads
