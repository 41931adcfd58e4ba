"""Structured logs: one JSON object per line on stderr.

Only metadata is ever logged (request ids, sizes, statuses, timings); callers
must never pass share values, images or logits, and nothing here formats them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def log(event: str, **fields: Any) -> None:
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()
