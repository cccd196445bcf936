"""A MkDocs hook: the changelog page is the repository's CHANGELOG.md.

Its links into the docs are written from the repository's root (``docs/x.md``);
on the site they are relative to the page (``x.md``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["on_page_markdown"]

_CHANGELOG = Path(__file__).resolve().parents[2] / "CHANGELOG.md"
_DOCS_LINK = re.compile(r"\]\(docs/")


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    """Replace the changelog page's text by CHANGELOG.md, its docs links made relative."""
    if page.file.src_uri != "changelog.md":
        return markdown
    return _DOCS_LINK.sub("](", _CHANGELOG.read_text(encoding="utf-8"))
