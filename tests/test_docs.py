"""The reference pages list everything the code defines."""

import ast
import importlib
import re
import textwrap
from pathlib import Path

from task_ferry.checks import NUMBERS
from task_ferry.conf import DEFAULTS
from tests.code_blocks import code_blocks

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "task_ferry"


def test_settings_page_documents_every_setting():
    text = (DOCS / "settings.md").read_text()
    documented = set(re.findall(r"^`([A-Z_]+)`$", text, flags=re.MULTILINE))
    assert documented == set(DEFAULTS)


def test_settings_page_gives_each_settings_real_default():
    text = (DOCS / "settings.md").read_text()
    defaults = dict(re.findall(r"^`([A-Z_]+)`\n:   Default: `([^`]+)`", text, flags=re.MULTILINE))
    assert set(defaults) == set(DEFAULTS)
    wrong = {
        name: shown for name, shown in defaults.items() if ast.literal_eval(shown) != DEFAULTS[name]
    }
    assert not wrong, f"defaults that are not conf.DEFAULTS': {wrong}"


def test_checks_page_documents_every_check_id_and_no_other():
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    defined = set(re.findall(r"task_ferry\.([EW]\d{3})", source))
    documented = set(
        re.findall(
            r"^### task_ferry\.([EW]\d{3})$", (DOCS / "checks.md").read_text(), flags=re.MULTILINE
        )
    )
    assert defined, "no check ids found in the source"
    assert defined <= documented, f"undocumented check ids: {sorted(defined - documented)}"
    assert documented <= defined, f"documented ids no code emits: {sorted(documented - defined)}"


def test_e003_names_every_numeric_setting_it_checks():
    text = (DOCS / "checks.md").read_text()
    section = text.split("### task_ferry.E003\n", 1)[1].split("\n### ", 1)[0]
    missing = [name for name, *_range in NUMBERS if f"`{name}`" not in section]
    assert not missing, f"E003 checks these, its section does not name them: {missing}"


def test_architecture_page_places_every_module():
    text = (DOCS / "architecture.md").read_text()
    unplaced = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__" or "migrations" in parts:
            continue
        if parts[-2] == "commands":
            # A management command is named by itself: `task_ferry_sweep`.
            spellings = [parts[-1]]
        else:
            spellings = [".".join(parts), ".".join(parts[-2:])]
        if not any(f"`{spelling}" in text for spelling in spellings):
            unplaced.append(".".join(parts))
    assert not unplaced, f"modules docs/architecture.md does not name: {unplaced}"


# A dotted path into the package with a module and a name at least (``task_ferry.W007`` is a
# check id, ``task_ferry.run_job`` a task name); not part of a file's name.
DOTTED_PATH = re.compile(r"(?<![\w.-])task_ferry(?:\.\w+){2,}")
OPTIONAL_EXTRAS = {"celery", "kombu", "django_tasks", "django_tasks_db", "drf_spectacular"}


def doc_pages() -> list[Path]:
    """The pages of docs/; the README's own examples run in test_readme_examples."""
    return sorted(DOCS.glob("*.md"))


def resolves(path: str) -> bool:
    """Whether ``path`` names a module of the package or a name one defines, an attribute of
    a class included (``task_ferry.handler.JobHandler.cancel``). True when an optional extra
    it needs is not installed: the page is not wrong for that."""
    parts = path.split(".")
    # The longest prefix that is a module, then attributes down from it.
    for end in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in OPTIONAL_EXTRAS:
                return True
            continue
        for name in parts[end:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_resolves_names_of_modules_classes_and_their_attributes():
    assert resolves("task_ferry.handler")
    assert resolves("task_ferry.handler.JobHandler")
    assert resolves("task_ferry.handler.JobHandler.create_and_start")
    assert not resolves("task_ferry.handler.JobHandler.create_and_go")
    assert not resolves("task_ferry.handlers.JobHandler")


def test_every_import_in_the_pages_python_examples_works():
    wrong = []
    for page in doc_pages():
        for code in code_blocks(page, "python"):
            try:
                tree = ast.parse(textwrap.dedent(code))
            except SyntaxError:
                # An excerpt ("...", a method alone): its dotted names are still checked by
                # test_every_dotted_path_the_pages_name_exists.
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("task_"):
                    wrong += [
                        f"{page.name}: from {node.module} import {alias.name}"
                        for alias in node.names
                        if not resolves(f"{node.module}.{alias.name}")
                    ]
                elif isinstance(node, ast.Import):
                    wrong += [
                        f"{page.name}: import {alias.name}"
                        for alias in node.names
                        if alias.name.startswith("task_") and not resolves(alias.name)
                    ]
    assert not wrong, wrong


def test_every_dotted_path_the_pages_name_exists():
    """Settings values ("task_ferry.api.permissions.IsJobOwnerOrStaff"), include() targets and
    the names the prose gives in code spans."""
    wrong = [
        f"{page.name}: {path}"
        for page in doc_pages()
        for path in sorted(set(DOTTED_PATH.findall(page.read_text())))
        if not resolves(path)
    ]
    assert not wrong, wrong
