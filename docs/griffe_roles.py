"""griffe extension for the docs build: Sphinx roles in docstrings become Markdown.

The docstrings use reST roles (``:class:`~gyrodrop.GyroDropout```) so that they read
well in ``help()`` and in editors. mkdocstrings renders Markdown, so each role becomes a
code span, and a link to the API reference when it names a public ``gyrodrop`` object
(every name of ``gyrodrop.__all__`` is rendered there; ``docs/hooks.py`` checks that).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import gyrodrop

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")
_PUBLIC = {name for name in gyrodrop.__all__ if not name.startswith("_")}


def _markdown(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    display = target.rsplit(".", 1)[-1] if short else target
    if display.endswith("()"):
        display = display[:-2]
    name = target.removeprefix("gyrodrop.")
    head = name.split(".", 1)[0]
    if head in _PUBLIC:
        return f"[`{display}`][gyrodrop.{name}]"
    return f"`{display}`"


class SphinxRoles(griffe.Extension):
    """Rewrite reST roles in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_markdown, obj.docstring.value)
