"""Server-sent events, read back as the tests compare them."""

import json


def parse_events(text):
    """SSE text to a list of (event name or comment or retry, payload)."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append(("comment", block[1:].strip()))
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        if "retry" in fields:
            events.append(("retry", int(fields["retry"])))
        else:
            events.append((fields["event"], json.loads(fields["data"])))
    return events
