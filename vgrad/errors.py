"""Bad input, reported as one line: the key, the bad value and what is allowed.

Hydra already detects unknown choices, unknown keys and wrong types while composing
the config, but prints them over several lines with its search path; ``describe``
folds those exceptions (and vgrad's own :class:`ConfigError`) into a single line.
"""

from __future__ import annotations

import dataclasses
import re

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config value vgrad cannot run with."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        shown = "null" if value is None else value
        super().__init__(f"{key}={shown}: expected {allowed}")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def describe(exc: BaseException) -> str:
    """One line for a config error raised by vgrad, Hydra or OmegaConf."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, choice = exc.missing_cfg_file.rpartition("/")
        options = ", ".join(o for o in (exc.options or []) if not o.startswith("schema"))
        if group and options:
            return f"{group}={choice}: unknown choice; expected one of {options}"
        return f"{exc.missing_cfg_file}: no such config"
    if isinstance(exc, OverrideParseException):
        return f"{exc.override}: cannot parse this override ({_first_line(exc.message)})"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else None
    if isinstance(exc, OmegaConfBaseException):
        cause = exc
    if cause is not None:
        key = getattr(cause, "full_key", None)
        reason = _first_line(str(cause)).rstrip(".")
        override = re.search(r"override (\S+)", _first_line(str(exc)))
        where = override.group(1).strip("'.") if override else key
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            fields = _fields(getattr(cause, "object_type", None))
            allowed = f"; expected one of {', '.join(fields)}" if fields else ""
            return f"{where}: unknown key{allowed}"
        return f"{where}: {reason}" if where else reason
    if isinstance(exc, HydraException):
        return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return _first_line(str(exc))


def _fields(schema: object) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
