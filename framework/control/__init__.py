"""The fleet's control plane: operator-owned plans, the tenant registry, lifecycle.

``mtp control`` (framework/cli/control.py) serves :mod:`framework.control.api`;
data planes read the registry through :mod:`framework.control.registry_view`.
"""
