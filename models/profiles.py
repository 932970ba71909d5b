"""Profiles: named parameter sets read from params.yaml, merged over `default`."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

from models.environment import read_env

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = PROJECT_ROOT / "params.yaml"
DEFAULT_PROFILE = "default"


def active_profile() -> str:
    return read_env().profile


def _merge(base: dict, overlay: Mapping) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _unknown_keys(default: Mapping, overlay: Mapping, path: str = "") -> list[str]:
    """Keys of a profile's overrides that `default` does not have, as dotted paths. Inside a map
    that is empty in `default` (free-form, e.g. reward_models.sources) any key is allowed."""
    unknown = []
    for key, value in overlay.items():
        where = f"{path}{key}"
        if key not in default:
            unknown.append(where)
        elif isinstance(value, Mapping) and isinstance(default[key], Mapping) and default[key]:
            unknown += _unknown_keys(default[key], value, where + ".")
    return unknown


def project_path(path: str | Path) -> Path:
    """A configured path (VAS_DATA_DIR, VAS_PARAMS_FILE, --data-dir): relative ones resolve against the project root."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def active_params_file() -> Path:
    """$VAS_PARAMS_FILE (your own profiles, e.g. a copy of params.yaml with one added), else the
    project's params.yaml."""
    path = read_env().params_file
    return project_path(path) if path else PARAMS_FILE


def load_profile(name: str | None = None, params_file: str | Path | None = None) -> dict[str, Any]:
    """All parameters of a profile: `default` with the profile's overrides merged in. `default` is
    complete, so an override naming a key it lacks is a typo, and an error, not a silent no-op.
    params_file None: active_params_file()."""
    name = name or active_profile()
    params_file = Path(params_file) if params_file else active_params_file()
    if not params_file.is_file():
        raise FileNotFoundError(f"params file {params_file} does not exist (VAS_PARAMS_FILE names the file "
                                f"holding the profiles; unset, it is {PARAMS_FILE})")
    with open(params_file, encoding="utf-8") as handle:
        profiles = yaml.safe_load(handle)
    if name not in profiles:
        known = ", ".join(sorted(profiles))
        raise KeyError(f"unknown profile {name!r} in {params_file}; known: {known}")
    overlay = profiles[name] or {}
    if unknown := _unknown_keys(profiles[DEFAULT_PROFILE], overlay):
        raise KeyError(f"profile {name!r} in {params_file} sets parameter(s) the default profile does not have: "
                       f"{', '.join(unknown)}")
    return _merge(profiles[DEFAULT_PROFILE], overlay)


def resolve(profile: Mapping[str, Any], section: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """One asset's parameters: the profile's section, the shared seed, then explicit overrides."""
    params = {"seed": profile["seed"], **copy.deepcopy(profile.get(section, {}))}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in params:
            raise KeyError(f"unknown parameter {section}.{key}; known: {', '.join(sorted(params))}")
        params[key] = value
    return params


def config_from(cls, params: Mapping[str, Any], section: str = "", ignore: tuple[str, ...] = (), **overrides):
    """Build a models/ config dataclass from resolved params: YAML lists turned into tuples where
    the dataclass holds tuples, then explicit overrides. A key the dataclass does not have is an
    error naming its path (`section.key`), so a typo in params.yaml cannot silently do nothing;
    `ignore` names the keys the caller reads itself (asset-level keys such as `source`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields) - set(ignore))
    if unknown:
        paths = ", ".join(f"{section}.{key}" if section else key for key in unknown)
        raise KeyError(f"unknown parameter(s) {paths} for {cls.__name__}; known: {', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        if name in params:
            value = params[name]
            values[name] = tuple(value) if isinstance(value, list) and isinstance(f.default, tuple) else value
    values.update(overrides)
    return cls(**values)
