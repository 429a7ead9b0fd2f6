"""Configuration files: read YAML or JSON safely, and say what is wrong with them field by field.

Used by every floor that reads a file the user wrote (task specs, plans, zoo files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from labelwright.specialists.errors import ConfigError


def error_lines(err: ValidationError, *, top: str = "(top level)") -> list[str]:
    """Each validation error as "field.path: message" (our validators' messages say what to do)."""
    return [f"{'.'.join(str(p) for p in e['loc']) or top}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()]


def read_config_file(path: str | Path, *, what: str, flag: str | None = None) -> Any:
    """The parsed content of a YAML or JSON file (by suffix; YAML otherwise), never executing anything."""
    path = Path(path)
    if not path.is_file():
        hint = f"; pass a YAML or JSON file to {flag}" if flag else "; fix the path"
        raise ConfigError(f"{what} {path} does not exist{hint}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except (json.JSONDecodeError, Exception) as exc:  # yaml.YAMLError has no common base we import
        raise ConfigError(f"{what} {path} is not valid {path.suffix or 'YAML'}: {exc}") from None
