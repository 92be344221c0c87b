"""The ``--interval`` option of the long-running commands."""

from __future__ import annotations

from django.core.management.base import CommandError

# Ten milliseconds: less (1e-300, say) makes a loop that queries the database without rest.
MIN_INTERVAL = 0.01
# A day; also keeps nan and inf out (time.sleep refuses them).
MAX_INTERVAL = 86400


def check_interval(seconds: float) -> None:
    """Raise ``CommandError`` unless ``seconds`` is from ``MIN_INTERVAL`` to ``MAX_INTERVAL``."""
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise CommandError(
            f"--interval must be a number of seconds from {MIN_INTERVAL:g} to {MAX_INTERVAL}; "
            f"got {seconds!r}."
        )
