"""Command output that passes for a terminal."""

import io


class TerminalOutput(io.StringIO):
    """Output that says it is a terminal, as a shell's stdout does."""

    def isatty(self):
        return True
