"""The one error every adapter reader and checker raises: it names the field that is wrong, so the
admin API can answer a 4xx that points at it and the CLI can print it."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter that cannot be served; `field` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
