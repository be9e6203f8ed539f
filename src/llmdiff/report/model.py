"""``Report``: a comparison plus the ways to write it out. The data itself is
:class:`llmdiff.compare.results.Comparison`; the JSON contract is documented in docs/report.md."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from llmdiff.compare.results import Comparison, Culprit, EntryResult, Tokens
from llmdiff.errors import UsageError
from llmdiff.gcpause import collector_paused

FORMATS = {".md": "markdown", ".csv": "csv", ".json": "json", ".html": "html", ".htm": "html"}


class Report:
    """The result of :func:`llmdiff.compare`. Truthy when the runs match."""

    def __init__(self, comparison: Comparison) -> None:
        self.comparison = comparison

    @property
    def verdict(self) -> str:
        return self.comparison.verdict

    @property
    def first_divergence(self) -> dict[str, Any] | None:
        return self.comparison.first_divergence

    @property
    def culprits(self) -> list[Culprit]:
        return self.comparison.culprits

    @property
    def tokens(self) -> Tokens:
        return self.comparison.tokens

    @property
    def entries(self) -> list[EntryResult]:
        return self.comparison.entries

    @property
    def exit_code(self) -> int:
        return self.comparison.exit_code

    def __bool__(self) -> bool:
        return self.verdict == "match"

    def __repr__(self) -> str:
        return f"<Report {self.verdict}: {len(self.entries)} entries, {len(self.culprits)} culprits>"

    def to_dict(self) -> dict[str, Any]:
        return self.comparison.to_json()

    def to_json(self, path: str | Path | None = None) -> str:
        return _rendered(lambda: _json_text(self.to_dict()), path)

    def to_markdown(self, path: str | Path | None = None, verbose: bool = False) -> str:
        from llmdiff.report.markdown import render_markdown

        return _rendered(lambda: render_markdown(self.comparison, verbose=verbose), path)

    def to_csv(self, path: str | Path | None = None) -> str:
        from llmdiff.report.csv import render_csv

        return _rendered(lambda: render_csv(self.comparison), path)

    def to_html(self, path: str | Path | None = None) -> str:
        from llmdiff.report.html import render_html

        return _rendered(lambda: render_html(self.comparison), path)

    def save(self, path: str | Path, verbose: bool = False) -> None:
        """Write the report in the format its extension names (.md, .csv, .json, .html; none or .txt: Markdown)."""
        suffix = Path(path).suffix.lower()
        fmt = "markdown" if suffix in ("", ".txt") else FORMATS.get(suffix)
        if fmt is None:
            raise UsageError(f"-o: cannot tell the format of {path}; use .md, .csv, .json or .html")
        if fmt == "markdown":
            self.to_markdown(path, verbose=verbose)
        else:
            getattr(self, f"to_{fmt}")(path)


def _rendered(render: Callable[[], str], path: str | Path | None) -> str:
    # A writer builds an object per entry while the comparison (tens of thousands of entries) is alive: the
    # collector is kept off what exists (see llmdiff.gcpause).
    with collector_paused():
        return _write(render(), path)


def _json_text(report: dict[str, Any]) -> str:
    """The report indented, except its entries: one compact line each, written by orjson. Indenting them
    sent tens of thousands of records through json's pure-Python encoder (seconds on a decode compare)."""
    head = json.dumps({k: v for k, v in report.items() if k != "entries"}, indent=1)
    entries = report["entries"]
    listed = "[\n  " + ",\n  ".join(map(_json_line, entries)) + "\n ]" if entries else "[]"
    return f'{head[:-2]},\n "entries": {listed}\n}}'


def _json_line(record: dict[str, Any]) -> str:
    try:
        return orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:  # what orjson refuses (a lone surrogate, a 65-bit integer) json writes
        return json.dumps(record)


def _write(text: str, path: str | Path | None) -> str:
    if path is not None:
        try:
            Path(path).write_text(text, encoding="utf-8", errors="backslashreplace")
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    return text
