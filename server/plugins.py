"""Plugins: Python modules the server imports at start-up (`--plugins`), before any adapter is read.

A plugin extends the server through its public registration APIs, for example a new intervention
type with `server.reft.interventions.register_intervention_type`; importing the module is all it
takes. `reft-server train --plugins` loads the same modules, so a plugin type trains and serves alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


class PluginError(RuntimeError):
    pass


def split_plugins(value: str | Iterable[str] | None) -> list[str]:
    """ "a.b, c" or ["a.b", "c"] -> ["a.b", "c"] (flags and environment variables give one string)."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else value
    return [part.strip() for part in parts if part.strip()]


def load_plugins(modules: Iterable[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # a plugin may raise anything while it loads
            raise PluginError(f"plugin {name!r} failed to load: {type(e).__name__}: {e}") from e
