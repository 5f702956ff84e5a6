"""mtp security sidecar: the aiohttp proxy in front of the framework."""
