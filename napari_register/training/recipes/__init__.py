"""Training recipes, one module per trainable method (listed in :data:`RECIPES`).

A recipe module defines ``DIMS`` (the dimensionalities it trains), ``OPTIONS`` (its own settings
with their defaults: the keys ``--recipe-options`` accepts) and ``recipe(settings, options) ->
Recipe``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

RECIPES = ("carl", "ran", "art", "alto")


def get_recipe(method: str) -> ModuleType:
    """The recipe module of ``method``; an error naming the trainable methods otherwise."""
    if method not in RECIPES:
        from ...methods.registry import list_methods

        known = list_methods()
        what = "has no network to train" if method in known else "is not a method"
        raise ValueError(f"method {method!r} {what}; trainable methods: {', '.join(RECIPES)}")
    return importlib.import_module(f"{__name__}.{method}")
