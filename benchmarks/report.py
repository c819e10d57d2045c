"""Where a benchmark's results go: a markdown table (spliced into BENCHMARKS.md by ``benchmarks.run
--full``), an optional PNG plot beside it and an optional JSON file with every number."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_report(
    *,
    command: str,
    table: str,
    results: list[dict[str, Any]],
    markdown: Path,
    json_path: Path | None = None,
    plot: Callable[[list[dict[str, Any]], Path], None] | None = None,
    plot_path: Path | None = None,
) -> None:
    """Print the table and write the files asked for (their folders are made)."""
    print(table)
    for path in (markdown, json_path, plot_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(table)
    if plot is not None and plot_path is not None:
        plot(results, plot_path)
    if json_path is not None:
        json_path.write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
