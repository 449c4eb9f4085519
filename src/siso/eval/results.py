"""The files of a benchmark directory that the runner writes and the summary reads: one module both
import, so neither imports the other."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"  # one line per finished (or failed) item, in completion order
SETTINGS_FILE = "bench.json"  # what the benchmark measures; a rerun must match it
RESULT_FILE = "result.json"  # an item's own record, inside its folder


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    """The records in results.jsonl; a line cut short by a killed run is ignored."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def latest_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The last record of each item (a rerun may have retried a failed one)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in read_results(out_dir):
        latest.pop(record["id"], None)
        latest[record["id"]] = record
    return latest


def append_result(out_dir: Path, record: dict[str, Any]) -> None:
    """One line per finished (or failed) item, flushed to disk at once: a killed run loses none."""
    path = out_dir / RESULTS_FILE
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
