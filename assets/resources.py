"""Resources shared by the assets: where data lives, which profile is active, the metrics DB."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import dagster as dg
from dagster_duckdb import DuckDBResource

from models.environment import read_env
from models.profiles import active_params_file, load_profile, project_path


class VasSettings(dg.ConfigurableResource):
    """The active profile and the data folder every asset reads from and writes to."""

    profile: str = "default"
    data_dir: str = "data"            # relative paths resolve against the project root
    params_file: str = ""             # "" = $VAS_PARAMS_FILE or the project's params.yaml
    device: str = "auto"              # "auto" picks CUDA when present, else CPU
    seed: Optional[int] = None        # replaces the profile's seed (`vas study`); None keeps it

    def params(self) -> dict:
        params = load_profile(self.profile, self.params_file or None)
        if self.seed is not None:
            params["seed"] = self.seed
        return params

    @property
    def root(self) -> Path:
        return project_path(self.data_dir)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


def settings_from_env(seed: int | None = None) -> VasSettings:
    env = read_env()
    return VasSettings(profile=env.profile, data_dir=env.data_dir, device=env.device, seed=seed,
                       params_file=str(active_params_file()))


def duckdb_for(settings: VasSettings) -> DuckDBResource:
    return DuckDBResource(database=str(settings.path("metrics.duckdb")))


def build_resources(settings: VasSettings | None = None) -> dict:
    settings = settings or settings_from_env()
    settings.root.mkdir(parents=True, exist_ok=True)
    return {"settings": settings, "duckdb": duckdb_for(settings)}
