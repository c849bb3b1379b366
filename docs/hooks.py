"""mkdocs hooks for the gyrodrop docs build.

- A line ``<!-- gyrodrop-help: COMMAND -->`` in a page becomes a code block holding
  ``gyrodrop COMMAND --help`` (``<!-- gyrodrop-help: -->`` for the top-level help), taken
  from the parser itself, so the CLI guide never drifts from the code.
- The API reference page must render every public name (``gyrodrop.__all__``): the
  build fails, naming the missing ones, otherwise.
- README sections that link files under ``docs/`` (the results plots) are included here
  rather than by the snippets extension, with those links made relative to the page.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

from mkdocs.exceptions import PluginError

_MARKER = re.compile(r"^<!-- gyrodrop-help:\s*([\w-]*)\s*-->$", re.MULTILINE)
_README_SECTION = re.compile(r'^--8<-- "README.md:([\w-]+)"$', re.MULTILINE)
_README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_section(name: str, up: str) -> str | None:
    """README section ``name`` with its ``docs/`` links rewritten, or ``None`` when it
    links nothing under ``docs/`` (the snippets extension includes it then)."""
    with open(_README, encoding="utf-8") as f:
        text = f.read()
    start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
    if start not in text or end not in text:
        return None
    section = text.split(start, 1)[1].split(end, 1)[0]
    if "](docs/" not in section:
        return None
    return section.replace("](docs/", f"]({up}")


def _help(command: str) -> str:
    from gyrodrop.experiments.cli import build_parser

    argv = [command, "--help"] if command else ["--help"]
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "88"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser().parse_args(argv)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    text = out.getvalue().rstrip()
    if not text:
        raise RuntimeError(f"docs hook: `gyrodrop {command} --help` printed nothing")
    return f"```text\n$ gyrodrop {command + ' ' if command else ''}--help\n{text}\n```"


def _check_api_page(markdown: str) -> None:
    import gyrodrop

    rendered = set(re.findall(r"^::: gyrodrop\.(\w+)\s*$", markdown, re.MULTILINE))
    missing = [n for n in gyrodrop.__all__ if not n.startswith("_") and n not in rendered]
    if missing:
        raise PluginError(f"docs/api.md: add `::: gyrodrop.NAME` entries for {missing}")


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "api.md":
        _check_api_page(markdown)
    up = "../" * page.file.src_uri.count("/")

    def include(m: re.Match[str]) -> str:
        section = _readme_section(m.group(1), up)
        return m.group(0) if section is None else section

    markdown = _README_SECTION.sub(include, markdown)
    return _MARKER.sub(lambda m: _help(m.group(1)), markdown)
