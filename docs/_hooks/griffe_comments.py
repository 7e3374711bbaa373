"""Griffe extension: attribute docs written as ``#:`` comments, as this codebase writes them.

``requests: int = 0  #: attempts sent`` and a ``#: ...`` line (or lines) right above an
attribute document it, the convention Sphinx's autodoc reads. Griffe reads only docstrings, so
this extension turns those comments into the attribute's docstring for the API reference.

It also hides an attribute's value when that value is implementation, not interface: a call of
a private helper (``max_wait = _check_seconds('max_wait', max_wait)``), a private validator
(``attrs.field(validator=_positive)``), ``self._...``. The reference shows the attribute, its
type and its documentation; its default is in the signature.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

#: A private name in an attribute's value: ``_check(...)``, ``validator=_positive``, ``self._x``.
PRIVATE = re.compile(r"(?<![\w.])_[A-Za-z]\w*|\bself\._")


class HashColonComments(griffe.Extension):
    """Give an attribute without a docstring the text of its ``#:`` comments."""

    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **_: Any) -> None:
        if attr.value is not None and PRIVATE.search(str(attr.value)):
            attr.value = None  # a private helper's call: implementation, not interface
        if attr.docstring is not None or not isinstance(node, ast.AST) or attr.lineno is None:
            return
        if not isinstance(attr.filepath, Path) or attr.filepath not in attr.lines_collection:
            return
        lines = attr.lines_collection[attr.filepath]
        text = _comment(lines, attr.lineno, attr.endlineno or attr.lineno)
        if text:
            attr.docstring = griffe.Docstring(text, parent=attr)


def _comment(lines: list[str], first: int, last: int) -> str:
    trailing = lines[last - 1].partition("#:")[2].strip()
    if trailing:
        return trailing
    above: list[str] = []
    index = first - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        above.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(above)
