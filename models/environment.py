"""Every VAS_* environment variable the project reads, in one place: name, default, meaning.

A field `name` is the variable VAS_<NAME>. `read_env()` reads them when called, not at import,
so a variable set later (the CLI's --profile, a test's monkeypatch.setenv) is seen.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping

PREFIX = "VAS_"


@dataclass(frozen=True)
class Environment:
    profile: str = "default"                # params.yaml profile
    data_dir: str = "data"                  # data folder; relative paths resolve against the project root
    params_file: str = ""                   # profiles file ("" = the project's params.yaml; relative: to the project root)
    device: str = "auto"                    # auto (CUDA when present), cpu or cuda
    retrain_cron: str = "0 2 * * *"         # when the nightly retrain schedule fires
    retrain_timezone: str = "UTC"
    retrain_schedule: str = "off"           # "on": the nightly retrain schedule starts running
    incoming_sensor: str = "on"             # "off": the new-data sensor starts stopped
    incoming_settle_seconds: float = 10.0   # a dropped file must sit unmodified this long before it is read
    require_browser: bool = False           # "1" (CI): the UI browser test fails instead of skipping
    require_llamacpp: bool = False          # "1" (CI): the llama.cpp server tests fail instead of skipping
    ui_screenshot: str = ""                 # where the UI browser test saves its screenshot ("" = data/ui/)
    executor: str = "default"               # "k8s": each step runs as a Kubernetes Job (deploy/README.md)
    progress: str = "auto"                  # progress bars: "auto" on a terminal, "on" always, "off" never


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def read_env(environ: Mapping[str, str] | None = None) -> Environment:
    """The VAS_* settings now in the environment, defaults for those not set."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(Environment):
        raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        if isinstance(f.default, bool):
            values[f.name] = raw == "1"
        else:
            values[f.name] = type(f.default)(raw)
    return Environment(**values)


def set_env(**values) -> None:
    """Set VAS_* variables by field name (for this process and the ones it starts)."""
    known = {f.name for f in dataclasses.fields(Environment)}
    for name, value in values.items():
        if name not in known:
            raise KeyError(f"unknown VAS setting {name!r}; known: {', '.join(sorted(known))}")
        os.environ[env_name(name)] = str(value)
