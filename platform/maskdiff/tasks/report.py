"""A small Markdown report: headings, paragraphs, tables, images and code blocks, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from maskdiff.files import write_text


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "–" if v != v else f"{v:.{digits}f}"
    return "–" if v is None else str(v)


class Report:
    def __init__(self, title: str):
        self.parts: list[str] = [f"# {title}\n"]

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"{'#' * level} {text}\n")

    def para(self, text: str) -> None:
        self.parts.append(text.strip() + "\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
        self.parts.append("\n".join(lines) + "\n")

    def image(self, path: str, alt: str) -> None:
        self.parts.append(f"![{alt}]({path})\n")

    def code(self, text: str, lang: str = "") -> None:
        self.parts.append(f"```{lang}\n{text.rstrip()}\n```\n")

    def write(self, path: str | Path) -> Path:
        return write_text(path, "\n".join(self.parts))


__all__ = ["Report", "fmt"]
