"""mtp framework: the Flask runtime that executes tenant services."""

__version__ = "0.1.0"
