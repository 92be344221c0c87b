"""The README is also the package's page on PyPI, where a relative link leads nowhere: its links
are absolute, and those into this repository name a file and a heading that exist."""

import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = "https://github.com/django-task-ferry/django-task-ferry"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped (hyphens
    and underscores kept), spaces turned into hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(github_anchor(line.lstrip("#")))
    return anchors


def readme_links() -> list[str]:
    return LINK.findall((ROOT / "README.md").read_text())


def test_the_readme_links_are_absolute():
    relative = [link for link in readme_links() if urlsplit(link).scheme != "https"]
    assert relative == []


def test_the_readme_links_into_the_repository_reach_a_file_and_heading():
    checked = 0
    for link in readme_links():
        if not link.startswith(REPOSITORY + "/"):
            continue
        url = urlsplit(link)
        kind, branch, *parts = url.path.removeprefix(urlsplit(REPOSITORY).path + "/").split("/")
        assert (kind, branch) in {("blob", "main"), ("tree", "main")}, link
        target = ROOT.joinpath(*parts)
        assert target.is_file() if kind == "blob" else target.is_dir(), link
        if url.fragment:
            assert url.fragment in anchors_of(target), link
        checked += 1
    assert checked >= 5


def test_the_package_metadata_names_the_repository():
    metadata = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert metadata["urls"]["Repository"] == REPOSITORY
