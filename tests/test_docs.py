"""The reference pages list everything the code defines."""

import re
from pathlib import Path

from task_ferry.conf import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_settings_page_documents_every_setting():
    text = (DOCS / "settings.md").read_text()
    documented = set(re.findall(r"^`([A-Z_]+)`$", text, flags=re.MULTILINE))
    assert documented == set(DEFAULTS)


def test_checks_page_documents_every_check_id():
    source = "\n".join(p.read_text() for p in (ROOT / "task_ferry").rglob("*.py"))
    defined = set(re.findall(r"task_ferry\.([EW]\d{3})", source))
    documented = set(
        re.findall(
            r"^### task_ferry\.([EW]\d{3})$", (DOCS / "checks.md").read_text(), flags=re.MULTILINE
        )
    )
    assert defined, "no check ids found in the source"
    assert defined <= documented, f"undocumented check ids: {sorted(defined - documented)}"
