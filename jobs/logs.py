"""Logging for the command: plain lines, or one JSON object per line (`--log-format json`) for
log collectors; the runner adds run_id, stage, seconds and rows_written to its records."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

FIELDS = ("run_id", "stage", "seconds", "rows_written")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                 **{f: getattr(record, f) for f in FIELDS if hasattr(record, f)}}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(verbose: bool, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    if json_lines:  # the run's own events always, library chatter only with --verbose
        logging.getLogger("recontext").setLevel(logging.INFO)
