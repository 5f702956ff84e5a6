"""Create and fetch orders: operations, an input schema and per-service config."""

import uuid

OPERATIONS = ["create", "get"]
MODE = "sync"
TIMEOUT = 10
INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "minLength": 1},
        "quantity": {"type": "integer", "minimum": 1},
        "order_id": {"type": "string"},
    },
    "additionalProperties": False,
}


def handle(context):
    if context.operation == "create":
        payload = context.payload or {}
        if "item" not in payload:
            return {"error": "item is required"}
        price = 9.5 if context.flags.enabled("new_pricing") else 10.0
        return {
            "order_id": uuid.uuid4().hex,
            "item": payload["item"],
            "quantity": payload.get("quantity", 1),
            "unit_price": price,
            "currency": context.config.get("currency", "EUR"),
            "created_by": context.user,
        }
    order_id = (context.payload or {}).get("order_id") or context.params.get("order_id")
    return {"order_id": order_id, "status": "shipped"}
