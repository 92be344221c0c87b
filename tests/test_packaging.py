"""What ``pip install django-task-ferry`` gives a project: the wheel built from this checkout
ships every file of the package (migrations, the admin template, the JavaScript client,
``py.typed``), the licence, and the metadata the extras promise."""

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Built from a copy of the checkout's files: setuptools would add what an earlier build
    # left in build/, hiding a file that package-data no longer names.
    source = tmp_path_factory.mktemp("source")
    for name in checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
        check=True,
        timeout=110,
    )
    (path,) = out.glob("django_task_ferry-*.whl")
    return zipfile.ZipFile(path)


def checkout_files(*paths: str) -> set[str]:
    """The files of the checkout (below ``paths``) that git tracks or would: ignored ones left
    out, deleted ones too."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    return {name for name in listed if (ROOT / name).is_file()}


def test_the_wheel_ships_every_file_of_the_package(wheel: zipfile.ZipFile) -> None:
    shipped = set(wheel.namelist())
    missing = checkout_files("task_ferry") - shipped
    assert not missing, f"files left out of the wheel: {sorted(missing)}"
    # The ones a project cannot run without, named so a failure says what broke.
    for name in (
        "task_ferry/migrations/0001_initial.py",
        "task_ferry/py.typed",
        "task_ferry/static/task_ferry/ferry.js",
        "task_ferry/templates/admin/task_ferry/job/pagination.html",
        "task_ferry/management/commands/task_ferry_sweep.py",
    ):
        assert name in shipped


def test_the_wheel_ships_no_tests_or_tooling(wheel: zipfile.ZipFile) -> None:
    top_level = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"task_ferry"}


def test_the_wheel_declares_its_licence_and_extras(wheel: zipfile.ZipFile) -> None:
    (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.message_from_bytes(wheel.read(metadata_name))
    assert metadata["License-Expression"] == "BSD-3-Clause"
    licence = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert licence and b"BSD 3-Clause" in wheel.read(licence[0])
    assert {"celery", "django-tasks", "openapi"} <= set(metadata.get_all("Provides-Extra"))
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("Django>=5.2") for r in requires)
    assert any(r.startswith("celery[redis]") and 'extra == "celery"' in r for r in requires)
