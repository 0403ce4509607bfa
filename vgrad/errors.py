"""Bad input, reported as one line: the key, the bad value and what is allowed.

Hydra already detects unknown choices, unknown keys and wrong types while composing
the config, but prints them over several lines with its search path; ``describe``
folds those exceptions (and vgrad's own :class:`ConfigError`) into a single line. A
launcher whose Hydra plugin is not installed (``hydra/launcher=parallel`` or ``slurm``
without the ``launchers`` extra) is named with the ``pip install`` that provides it.
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


def at_least(key: str, value: float, low: float) -> None:
    """Refuse ``key=value`` below ``low`` (NaN included)."""
    if not value >= low:
        raise ConfigError(key, value, f"a number >= {low:g}")


def one_of(key: str, value: str, allowed: object) -> None:
    """Refuse ``key=value`` outside ``allowed`` (names), listing them."""
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(allowed))


#: Hydra's launcher plugins that vgrad's ``launchers`` extra installs, and which of
#: vgrad's launcher configs (``conf/hydra/launcher``) run on each.
LAUNCHER_PLUGINS = {"joblib": "hydra/launcher=parallel runs on it",
                    "submitit": "hydra/launcher=slurm runs on it"}
LAUNCHERS_INSTALL = 'pip install "vgrad[launchers]"'


def launcher_plugin(group: str, choice: str) -> str | None:
    """The plugin (``joblib``, ``submitit``) that provides launcher ``choice`` when
    Hydra found no config for it: ``hydra/launcher=parallel`` asks for
    ``hydra/launcher/joblib``, ``slurm`` for ``submitit_slurm``; ``submitit_local``."""
    if group.strip("/") != "hydra/launcher":
        return None
    if choice == "joblib":
        return "joblib"
    if choice.startswith("submitit_"):
        return "submitit"
    return None


class ComposeError(ValueError):
    """Overrides Hydra could not compose into a config (an unknown choice, key or type,
    an unparsable override), raised by :mod:`vgrad.api` with :func:`describe`'s line."""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def describe(exc: BaseException) -> str:
    """One line for a config error raised by vgrad, Hydra or OmegaConf."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, choice = exc.missing_cfg_file.rpartition("/")
        if (plugin := launcher_plugin(group, choice)) is not None:
            return (f"{group}={choice}: Hydra's {plugin} launcher plugin is not installed "
                    f"({LAUNCHER_PLUGINS[plugin]}): {LAUNCHERS_INSTALL}")
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
