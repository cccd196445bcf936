"""A griffe extension: the docstrings' reST roles (:class:`X`) become links in the docs site.

The package's docstrings cite objects the Sphinx way (``:func:`connect```,
``:meth:`~Sandbox.stop```). Each role becomes an optional autorefs link to the
object the name resolves to from the docstring's own scope: a link where the
site documents that object, plain code where it does not (the standard library,
private helpers).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

__all__ = ["RstRoles"]

_ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|attr|mod|exc|data|obj|const):`(~?)([\w.]+)(\(\))?`"
)


def _resolve(obj: griffe.Object, name: str) -> str | None:
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head)
    except (griffe.NameResolutionError, AttributeError, KeyError):
        if head != obj.package.name:
            return None
        path = head
    return f"{path}.{rest}" if rest else path


class RstRoles(griffe.Extension):
    """Rewrite reST cross-reference roles in every docstring as autorefs links."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None or ":" not in obj.docstring.value:
            return

        def link(match: re.Match[str]) -> str:
            tilde, name, call = match.groups()
            shown = (name.rsplit(".", 1)[-1] if tilde else name) + (call or "")
            code = f"<code>{html.escape(shown)}</code>"
            target = _resolve(obj, name)
            if target is None:
                return code
            return f'<autoref identifier="{html.escape(target)}" optional>{code}</autoref>'

        obj.docstring.value = _ROLE.sub(link, obj.docstring.value)
