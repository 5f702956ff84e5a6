"""Say hello to the caller (sync or async)."""


def handle(context):
    name = context.payload.get("name") if isinstance(context.payload, dict) else None
    return {"message": f"Hello, {name or context.user}!", "tenant": context.tenant_id}
