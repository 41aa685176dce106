"""The harness's JSON-lines store.

Each process (one per shard) owns one file ``<results>/runs-shard<I>of<N>.jsonl``. A finished run is
appended by writing the whole file's new content atomically (``files.atomic_write_text``), so a reader (or a
crash) sees the file before or after the append, never a partial line. Shards never write the same file, so
concurrent shards on a shared file system lose nothing. A re-run reads every ``*.jsonl`` under the folder and
skips the run ids it finds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import atomic_write_text

__all__ = ["ResultStore", "read_results"]


def read_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every run recorded under ``results_dir`` (all ``*.jsonl`` files; duplicates by run id dropped)."""
    out: dict[str, dict[str, Any]] = {}
    d = Path(results_dir)
    if not d.is_dir():
        return []
    for f in sorted(d.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # cannot happen with atomic writes; tolerate hand-edited files
            if isinstance(rec, dict) and "run_id" in rec:
                out.setdefault(rec["run_id"], rec)
    return list(out.values())


class ResultStore:
    """One writer's JSON-lines file, appended atomically (temp file + rename of the whole file)."""

    def __init__(self, results_dir: str | Path, shard: tuple[int, int] = (0, 1)):
        self.dir = Path(results_dir)
        self.path = self.dir / f"runs-shard{shard[0]}of{shard[1]}.jsonl"

    def finished_ids(self) -> set[str]:
        return {r["run_id"] for r in read_results(self.dir)}

    def append(self, record: dict[str, Any]) -> None:
        old = self.path.read_text() if self.path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write_text(self.path, old + json.dumps(record, sort_keys=True) + "\n")
