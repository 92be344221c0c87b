"""The ``--interval`` option of the long-running commands."""

from __future__ import annotations

from django.core.management.base import CommandError

# A day; also keeps nan and inf out (time.sleep refuses them).
MAX_INTERVAL = 86400


def check_interval(seconds: float) -> None:
    """Raise ``CommandError`` unless ``seconds`` is > 0 and at most ``MAX_INTERVAL``."""
    if not 0 < seconds <= MAX_INTERVAL:
        raise CommandError(
            f"--interval must be a number of seconds > 0, at most {MAX_INTERVAL}; got {seconds!r}."
        )
