"""MkDocs hook: the docstrings in src/gibbs use Sphinx roles
(``:class:`~gibbs.Hub```), which Markdown renders as the role's name beside
a code span. Show the code span alone, as Sphinx would (``~`` keeps the last
part of the dotted name)."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|attr|meth|func|exc|mod|data|obj):<code>(~?)([\w.]+)(\(\))?</code>")


def _code(m: re.Match) -> str:
    name = m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)
    return f"<code>{name}{m.group(3) or ''}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_code, html)
