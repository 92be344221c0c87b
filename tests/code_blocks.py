"""The fenced code blocks of the docs pages and the README, the definitions in their Python
ones, and the code of a copy of one, as compared with its page's."""

import ast
import re
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.MULTILINE | re.DOTALL)


def code_blocks(page: Path, language: str) -> list[str]:
    """The blocks of ``page`` fenced as ``language``, in order, as written."""
    return [code for fenced_as, code in FENCE.findall(page.read_text()) if fenced_as == language]


def definition(source: str, name: str) -> ast.FunctionDef | ast.ClassDef | None:
    """The function or class ``name`` defined at the top level of ``source``."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return node
    return None


def page_definitions(page: Path, name: str) -> list[ast.FunctionDef | ast.ClassDef]:
    """Each function or class ``name`` that a Python block of ``page`` defines, in order."""
    found = []
    for source in code_blocks(page, "python"):
        try:
            node = definition(source, name)
        except SyntaxError:
            # An excerpt indented as a method of a class shown before.
            continue
        if node is not None:
            found.append(node)
    return found


def page_definition(page: Path, name: str) -> ast.FunctionDef | ast.ClassDef:
    """The function or class ``name`` that a Python block of ``page`` defines: there must be
    exactly one."""
    found = page_definitions(page, name)
    assert len(found) == 1, f"{page.name} defines {name} in {len(found)} Python blocks, not one"
    return found[0]


def is_excerpt(node: ast.ClassDef) -> bool:
    """Whether the class is shown in part: a ``...`` stands for the rest of its body."""
    return any(
        isinstance(item, ast.Expr)
        and isinstance(item.value, ast.Constant)
        and item.value.value is Ellipsis
        for item in node.body
    )


def code(node: ast.FunctionDef | ast.ClassDef) -> str:
    """``node`` as code, comments and layout aside, and without ``@pytest.mark.usefixtures``:
    how a copy in the tests brings in the stand-ins its page leaves to the reader."""
    node.decorator_list = [
        decorator
        for decorator in node.decorator_list
        if not (
            isinstance(decorator, ast.Call)
            and ast.unparse(decorator.func) == "pytest.mark.usefixtures"
        )
    ]
    return ast.unparse(node)
