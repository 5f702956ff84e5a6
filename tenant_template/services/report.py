"""Build a slow report in the background (always answered with a job)."""

import time

MODE = "async"
TIMEOUT = 60
INPUT_SCHEMA = {
    "type": "object",
    "properties": {"rows": {"type": "integer", "minimum": 0, "maximum": 100000},
                   "seconds": {"type": "number", "minimum": 0, "maximum": 30}},
}


def handle(context):
    payload = context.payload or {}
    time.sleep(payload.get("seconds", 0.5))
    rows = payload.get("rows", 10)
    context.logger.info("report built", extra={"rows": rows})
    return {"rows": rows, "total": rows * (rows + 1) // 2}
