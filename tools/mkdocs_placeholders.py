"""mkdocs hook: a page in the nav that another change has not written yet gets a placeholder,
so ``mkdocs build --strict`` checks everything else meanwhile. Remove once every page exists."""

from __future__ import annotations

import logging
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.placeholders")


def nav_pages(items: Any) -> list[str]:
    pages: list[str] = []
    for item in items or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            pages.extend(nav_pages(value))
        elif isinstance(value, str) and value.endswith(".md"):
            pages.append(value)
    return pages


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    for page in nav_pages(config.nav):
        if files.get_file_from_path(page) is None:
            title = page.removesuffix(".md").replace("-", " ").capitalize()
            log.info("placeholder for missing page %s", page)
            content = f"# {title}\n\nThis page is being written.\n"
            files.append(File.generated(config, page, content=content))
    return files
