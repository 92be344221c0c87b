"""The public API's types, as a user's mypy with django-stubs sees them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mypy", reason="mypy is not installed")


@pytest.mark.parametrize("user_code", ["public_api.py", "job_type_models.py"])
def test_user_code_against_the_public_api_type_checks(user_code):
    result = subprocess.run(
        [sys.executable, "-m", "mypy", f"tests/typing/{user_code}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
