"""Answers written in LaTeX: the reference answers of MATH-style datasets and the rewards both read them."""

from __future__ import annotations

import re


def boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        m = re.search(r"\\boxed (\S+)", text)  # "\boxed 5"
        return m.group(1).rstrip("$.") if m else None
    i, depth = text.index("{", start) + 1, 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None
