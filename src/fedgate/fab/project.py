"""The FAB's pyproject.toml: who published it, what it is called, which version, which code runs.

Publisher, name and version are checked against strict patterns because Flower joins them into
install paths unchecked (`{publisher}.{name}.{version}.{hash8}`; a version of
"0.1.0/../../x" escapes the apps folder). fedgate never puts them in a path, but a hospital reads
them when it approves a FAB, so they must be what they look like. Entry points must name modules
the FAB itself contains, so the ClientApp that runs is code the hospital can read in the report."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from fedgate.canonical import decimal_str
from fedgate.fab.flower_rules import (
    APP_ID_PATTERN,
    APP_VERSION_PATTERN,
    MAX_NAME_LENGTH,
    is_valid_name,
    validate_config,
)
from fedgate.fab.report import ConfigDefault, FabRefused

# Flower's name rule (flwr.supercore.utils.is_valid_name), restricted to ASCII: its isalpha() also
# accepts look-alike letters from other scripts.
NAME = re.compile(rf"[A-Za-z][A-Za-z0-9-]{{0,{MAX_NAME_LENGTH - 1}}}", re.ASCII)
# Flower has no publisher rule of its own beyond APP_ID_PATTERN's "[A-Za-z0-9_.-]+", which admits
# "..": ours drops the dot and bounds the length, and the result must still fit APP_ID_PATTERN.
PUBLISHER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,38}", re.ASCII)
MAX_VERSION_CHARS = 32
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
OBJECT_REF = re.compile(
    rf"(?P<module>{IDENTIFIER}(?:\.{IDENTIFIER})*):(?P<attr>{IDENTIFIER}(?:\.{IDENTIFIER})*)", re.ASCII
)
COMPONENTS = ("clientapp", "serverapp")
CONFIG_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)


@dataclass(frozen=True)
class AppProject:
    publisher: str
    name: str
    version: str
    client_app: str
    server_app: str
    run_config: tuple[ConfigDefault, ...]


def read_project(pyproject: bytes, files: Collection[str]) -> AppProject:
    """pyproject.toml's metadata, entry points and run-config defaults, each checked."""
    try:
        config = tomllib.loads(pyproject.decode("utf-8"))
    except Exception as err:  # UnicodeDecodeError, TOMLDecodeError, RecursionError on deep nesting
        raise FabRefused("pyproject", f"pyproject.toml is not UTF-8 TOML: {type(err).__name__}: {err}") from None
    project = _table(config, "project")
    app = _table(_table(_table(config, "tool"), "flwr", "tool."), "app", "tool.flwr.")

    publisher = _string(app, "publisher", "[tool.flwr.app] publisher", "metadata-publisher")
    name = _string(project, "name", "[project] name", "metadata-name")
    version = _string(project, "version", "[project] version", "metadata-version")
    if not PUBLISHER.fullmatch(publisher):
        raise FabRefused(
            "metadata-publisher",
            "publisher must be 1-39 of A-Z a-z 0-9 _ -, starting with a letter or digit",
            value=repr(publisher[:200]),
        )
    if not NAME.fullmatch(name) or not is_valid_name(name)[0]:
        raise FabRefused(
            "metadata-name",
            f"name must start with a letter and hold only A-Z a-z 0-9 -, at most {MAX_NAME_LENGTH} characters",
            value=repr(name[:200]),
        )
    if len(version) > MAX_VERSION_CHARS or not re.fullmatch(APP_VERSION_PATTERN, version, re.ASCII):
        raise FabRefused(
            "metadata-version", "version must be MAJOR.MINOR.PATCH digits (e.g. 1.0.3)", value=repr(version[:200])
        )
    if not re.fullmatch(APP_ID_PATTERN, f"@{publisher}/{name}"):  # implied by the two above; Flower's own form
        raise FabRefused(
            "metadata-publisher", "publisher/name do not form a Flower app id", value=f"@{publisher}/{name}"
        )

    components = _table(app, "components", "tool.flwr.app.")
    extra = sorted(set(components) - set(COMPONENTS))
    if extra:
        raise FabRefused(
            "entry-point", "[tool.flwr.app.components] may name only clientapp and serverapp", key=extra[0]
        )
    client_app, server_app = (_entry_point(components, key, files) for key in COMPONENTS)

    run_config = _run_config(app.get("config", {}), "")
    try:
        valid, errors, _ = validate_config(config, check_module=False)
    except Exception as err:  # Flower's validators raise as well as return errors
        valid, errors = False, [f"{type(err).__name__}: {err}"]
    if not valid:
        raise FabRefused("pyproject", "Flower rejects this configuration", errors="; ".join(errors)[:1000])
    return AppProject(publisher, name, version, client_app, server_app, tuple(sorted(run_config, key=lambda c: c.key)))


def _table(parent: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise FabRefused("pyproject", f"pyproject.toml has no [{prefix}{key}] table")
    return value


def _string(table: dict[str, Any], key: str, where: str, rule: str) -> str:
    value = table.get(key)
    if not isinstance(value, str):
        raise FabRefused(rule, f"{where} is missing or not a string", value=repr(value)[:200])
    return value


def _entry_point(components: dict[str, Any], key: str, files: Collection[str]) -> str:
    ref = components.get(key)
    if not isinstance(ref, str):
        raise FabRefused("entry-point", f"[tool.flwr.app.components] has no {key} string", key=key)
    match = OBJECT_REF.fullmatch(ref)
    if match is None:
        raise FabRefused(
            "entry-point", f"{key} must be MODULE:ATTRIBUTE of Python identifiers", key=key, value=repr(ref[:200])
        )
    module_path = match["module"].replace(".", "/")
    if f"{module_path}.py" not in files and f"{module_path}/__init__.py" not in files:
        raise FabRefused(
            "entry-point",
            f"{key} names module {match['module']!r}, which is not inside the FAB",
            key=key,
            value=ref,
        )
    return ref


def _run_config(table: object, prefix: str) -> list[ConfigDefault]:
    if not isinstance(table, dict):
        raise FabRefused("run-config", "[tool.flwr.app.config] must be a table", key=prefix or "config")
    defaults = []
    for key, value in table.items():
        if not CONFIG_KEY.fullmatch(key):
            raise FabRefused(
                "run-config", "run-config key must be 1-128 of A-Z a-z 0-9 _ -", key=repr(f"{prefix}{key}"[:200])
            )
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            defaults += _run_config(value, f"{full}.")
        elif isinstance(value, bool):
            defaults.append(ConfigDefault(full, "bool", "true" if value else "false"))
        elif isinstance(value, int):
            defaults.append(ConfigDefault(full, "int", str(value)))
        elif isinstance(value, float):
            defaults.append(ConfigDefault(full, "float", decimal_str(value)))
        elif isinstance(value, str):
            defaults.append(ConfigDefault(full, "str", value))
        else:
            raise FabRefused(
                "run-config",
                f"run-config default is a {type(value).__name__}; Flower takes bool, int, float or str",
                key=full,
            )
    return defaults
