"""docs/index.md's quickstart, done as the page says in a new project of its own: startproject,
then each block in page order. A file's block is written where its first line says (a block
with ``...`` in a list adds to the file startproject wrote), ``python manage.py`` lines run on
the project's SQLite database, the shell snippet runs in ``manage.py shell``; then the page's
view is requested. task_ferry comes from this checkout, on PYTHONPATH, not from pip."""

import ast
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TypeGuard

from tests.code_blocks import FENCE

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "index.md"

# The first line of a block that is a file of the project, where it goes: "# myapp/models.py",
# or in a template "{# myapp/templates/myapp/exports.html #}".
PATH_COMMENT = re.compile(r"(?:# |\{# )([\w./-]+\.\w+)(?: #\})?")


def quickstart() -> str:
    return PAGE.read_text().split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]


class Project:
    """A project directory (the one with ``manage.py``) and a way to run Python in it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        env = {
            name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"
        }
        self.env = {**env, "PYTHONPATH": str(ROOT), "DJANGO_SUPERUSER_PASSWORD": "pw"}

    def run(self, *arguments: str) -> str:
        """Run ``python *arguments`` there; what it printed, once it succeeded."""
        result = subprocess.run(
            [sys.executable, *arguments],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (
            f"python {shlex.join(arguments)} failed:\n{result.stdout}{result.stderr}"
        )
        return result.stdout

    def shell(self, code: str) -> str:
        return self.run("manage.py", "shell", "-c", code)


def additions(code: str) -> str:
    """A block that shows new lines of a file among its old ones, ``...`` standing for the old
    items of a list, as lines to append to the file: ``NAME = [..., new]`` becomes
    ``NAME = [*NAME, new]``."""
    lines = code.splitlines(keepends=True)
    for node in ast.walk(ast.parse(code)):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.List)
            and node.value.elts
            and is_ellipsis(node.value.elts[0])
        ):
            (target,) = node.targets
            assert isinstance(target, ast.Name)
            old = node.value.elts[0]
            line = lines[old.lineno - 1]
            lines[old.lineno - 1] = (
                f"{line[: old.col_offset]}*{target.id}{line[old.end_col_offset :]}"
            )
    appended = "".join(lines)
    left = [node for node in ast.walk(ast.parse(appended)) if is_ellipsis(node)]
    assert not left, f"a `...` this test cannot fill in, line {left[0].lineno} of:\n{code}"
    return appended


def is_ellipsis(node: ast.AST) -> TypeGuard[ast.Constant]:
    return isinstance(node, ast.Constant) and node.value is Ellipsis


def write_file(project: Project, language: str, code: str, path: str) -> None:
    target = project.directory / path
    if language == "python" and any(is_ellipsis(node) for node in ast.walk(ast.parse(code))):
        assert target.exists(), f"the page adds to {path}, which startproject did not write"
        with target.open("a") as file:
            file.write("\n" + additions(code))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code)


def run_commands(project: Project, code: str) -> None:
    """The block's ``python manage.py`` lines; the others install the package, which comes
    from the checkout here."""
    for line in code.splitlines():
        if line.startswith("python manage.py "):
            project.run(*shlex.split(line)[1:])


def run_snippet(project: Project, snippet: str) -> None:
    """The shell snippet, run by the user the page names, with an inactive user beside it
    (``active_only=False`` exports both); it prints what its comment shows, and the CSV file
    it writes lists the users."""
    project.run(
        "manage.py", "createsuperuser", "--noinput", "--username", "admin", "--email", "a@x.org"
    )
    project.shell(
        "from django.contrib.auth import get_user_model\n"
        "get_user_model().objects.create_user('bob', 'b@x.org', is_active=False)"
    )
    printed = project.shell(snippet).splitlines()[-1]
    shown = re.search(r"^print\(.*\)  # (.+)$", snippet, flags=re.MULTILINE)
    assert shown, "the snippet shows no output in a comment after its print()"
    expected = re.escape(shown[1]).replace(re.escape("/.../"), "/.*/")
    assert re.fullmatch(expected, printed), f"the snippet printed {printed!r}, not {shown[1]!r}"
    state, path = printed.split(" ", 1)
    assert state == "finished"
    assert Path(path) == project.directory / "exports" / "users-1.csv"
    with Path(path).open(newline="") as file:
        assert list(csv.reader(file)) == [
            ["id", "username", "email"],
            ["1", "admin", "a@x.org"],
            ["2", "bob", "b@x.org"],
        ]


# The page's view, requested as the superuser: a POST starts an export, of active users only,
# and the page then shows a bar for each job; the bar's API answers for the job.
REQUEST_THE_VIEW = """
import json
from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from django.test import Client
from django.test.utils import setup_test_environment

setup_test_environment()
client = Client()
anonymous = client.get("/exports/")
client.force_login(get_user_model().objects.get(username="admin"))
posted = client.post("/exports/")
page = client.get("/exports/")
job = client.get("/api/jobs/2/")
print(json.dumps({
    "anonymous": anonymous.status_code,
    "posted": [posted.status_code, posted.get("Location")],
    "page": [page.status_code, page.content.decode()],
    "job": [job.status_code, job.json()],
    "static": {path: bool(finders.find(path)) for path in ["task_ferry/ferry.css", "task_ferry/ferry.js"]},
}))
"""


def request_the_view(project: Project) -> None:
    seen = json.loads(project.shell(REQUEST_THE_VIEW).splitlines()[-1])
    assert seen["anonymous"] == 302  # staff only
    assert seen["posted"] == [302, "/exports/"]
    status, page = seen["page"]
    assert status == 200
    assert re.findall(r'<task-ferry-progress job-id="(\d+)">', page) == ["2", "1"]
    for path, found in seen["static"].items():
        assert f'"/static/{path}"' in page
        assert found, f"the page links {path}, which no static files finder finds"
    status, job = seen["job"]
    assert status == 200
    assert (job["state"], job["progress_percentage"]) == ("finished", 100)
    with (project.directory / "exports" / "users-2.csv").open(newline="") as file:
        assert [row[1] for row in csv.reader(file)] == ["username", "admin"]  # active only


def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    section = quickstart()
    name = re.search(r"`django-admin startproject (\w+)", section)
    assert name, "the quickstart no longer says how to start a project"
    Project(tmp_path).run("-m", "django", "startproject", name[1])
    project = Project(tmp_path / name[1])

    snippets = []
    for language, code in FENCE.findall(section):
        path = PATH_COMMENT.fullmatch(code.split("\n", 1)[0])
        if language == "sh":
            run_commands(project, code)
        elif path and language in ("python", "django"):
            write_file(project, language, code, path[1])
        elif language == "python":
            snippets.append(code)
            run_snippet(project, code)
        else:
            raise AssertionError(
                f"a {language} block this test does not know where to put:\n{code}"
            )
    assert len(snippets) == 1, f"the quickstart has {len(snippets)} shell snippets, not one"
    request_the_view(project)
