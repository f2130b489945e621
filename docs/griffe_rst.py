"""Griffe extension for the API reference: the docstrings' Sphinx roles and literal-block
markers, rendered as Markdown.

fwjax's docstrings are Google style with Sphinx cross-reference roles, which Markdown would show
verbatim: ``:func:`~fwjax.ops.delta_rule``` becomes the code span ``delta_rule`` (``~`` keeps the
last name, as in Sphinx), ``:class:`fwjax.nn.ModelConfig``` the full name. A paragraph ending in
``::`` (reST's literal-block marker) ends in ``:``; the indented block after it is already a
Markdown code block.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj|exc):`(~?)([^`]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.M)


def markdown(text: str) -> str:
    """``text`` with Sphinx roles as code spans and ``::`` paragraph ends as ``:``."""

    def role(match: re.Match) -> str:
        short, target = match.groups()
        return f"`{target.rsplit('.', 1)[-1] if short else target}`"

    return LITERAL_MARKER.sub(":", ROLE.sub(role, text))


class SphinxRolesToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
