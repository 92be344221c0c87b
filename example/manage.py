#!/usr/bin/env python
"""The example project's manage.py. Start everything with ``python example/manage.py runexample``."""

import os
import sys
from pathlib import Path


def main() -> None:
    # Lets the example run from a source checkout without installing the package.
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
