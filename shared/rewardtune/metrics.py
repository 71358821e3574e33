"""Metrics as JSON lines, one record per epoch."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSONL; on resume, records of epochs not covered by the checkpoint are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def _parse(self) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
        """(records, [(line number, line)] that are not a JSON object): one bad line never hides the rest."""
        if not self.path.exists():
            return [], []
        records, bad = [], []
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append((number, line))
        return records, bad

    def read(self) -> list[dict[str, Any]]:
        """Every well-formed record; unparsable lines (a torn last line from a crash mid-write) are skipped."""
        return self._parse()[0]

    def truncate_to(self, epochs_done: int) -> None:
        """Keep the records of epochs the checkpoint covers; unparsable lines move to `<name>.rejected`, said so."""
        records, bad = self._parse()
        kept = [r for r in records if isinstance(r.get("epoch"), int) and r["epoch"] < epochs_done]
        if bad:
            rejected = self.path.with_name(self.path.name + ".rejected")
            with rejected.open("a") as handle:
                handle.write("".join(line + "\n" for _, line in bad))
                handle.flush()
                os.fsync(handle.fileno())
            log.warning("%s: %d unparsable line(s) (first: line %d) moved to %s; the %d valid record(s) are kept",
                        self.path, len(bad), bad[0][0], rejected.name, len(kept))
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with tmp.open("w") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in kept))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
