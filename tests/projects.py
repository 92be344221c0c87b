"""Throwaway Django projects, for what only a fresh process shows: a settings mistake that
stops ``manage.py check`` before any test settings could be loaded."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).parents[1]


def manage_py_check(directory: Path, project_settings: dict[str, Any]) -> tuple[int, str]:
    """Run ``manage.py check`` of a project with these settings (written to ``directory`` as
    the module ``project_settings``, beside which its other modules may be written). Returns
    the exit code and what it printed, stdout then stderr."""
    return run_in_project(directory, project_settings, ["-m", "django", "check"])


def run_python(directory: Path, project_settings: dict[str, Any], code: str) -> tuple[int, str]:
    """Run ``code`` in a fresh process of a project with these settings, after
    ``django.setup()``, as ``manage_py_check`` runs ``check``."""
    return run_in_project(
        directory, project_settings, ["-c", f"import django\ndjango.setup()\n{code}"]
    )


def run_in_project(
    directory: Path, project_settings: dict[str, Any], arguments: list[str]
) -> tuple[int, str]:
    (directory / "project_settings.py").write_text(
        "".join(f"{name} = {value!r}\n" for name, value in project_settings.items())
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project_settings",
        "PYTHONPATH": os.pathsep.join([str(directory), str(REPOSITORY)]),
    }
    result = subprocess.run(
        [sys.executable, *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stdout + result.stderr
