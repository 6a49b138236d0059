"""Registration methods, one module each (listed in :data:`.registry.BUILTIN`), found by name."""
from .registry import Method, MethodOutput, get_method, list_methods, register_method

__all__ = ["Method", "MethodOutput", "get_method", "list_methods", "register_method"]
