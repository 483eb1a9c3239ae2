"""Reading the loosely typed fields clients send (lists may arrive as JSON strings, names comma-separated)."""

from __future__ import annotations

import json
from typing import Any


def as_list(value: Any, field: str) -> list:
    """A list field: a list, a JSON list string, or a comma-separated string; empty -> []."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{field} is not a valid JSON list: {text[:80]!r}") from error
        else:
            return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, (int, float)):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field} must be a list, got {type(value).__name__}")
    return list(value)


def free_text(request: dict[str, Any]) -> list[str]:
    """Free-text prompts from the task's ``text`` option (several separated by ';')."""
    text = request.get("text") or ""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    return [part.strip() for part in text.split(";") if part.strip()]
