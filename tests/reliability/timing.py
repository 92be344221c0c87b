"""Timing settings the reliability tests share."""

# Small enough that a lost worker is found in about a second.
FAST_HEARTBEAT = {"HEARTBEAT_INTERVAL": 0.2, "HEARTBEAT_TIMEOUT": 1, "PUBLISH_INTERVAL": 0.02}
