"""The one shape of every pipeline asset, declared from its entry in models/stages.py.

`@pipeline_asset("rollouts", RolloutsConfig, ...)` on `def rollouts(run) -> Produced` makes the
Dagster asset and runs, around the body, what every asset does: fixed torch threads (assets of
kind pytorch), the resolved params, the lineage inputs, re-use of an unchanged output, models/
logging routed to the run log, and `finish` (md5, DuckDB rows, metadata). The body holds only
the asset's own work and returns what it measured.
"""

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import dagster as dg
from dagster_duckdb import DuckDBResource

from assets.common import LogToDagster, finish, lineage_inputs, output_path, reuse, torch_threads
from assets.resources import VasSettings
from models.profiles import config_from, resolve
from models.stages import STAGES, code_version


@dataclass
class StageRun:
    """What an asset body gets: the run, its settings, the resolved params and what it read."""

    context: dg.AssetExecutionContext
    settings: VasSettings
    params: dict
    inputs: dict[str, str]
    config: Optional[dg.Config] = None    # the launchpad config (its fields are in params already)
    stage: str = ""                        # the asset's name, its entry in models/stages.py

    @property
    def log(self):
        return self.context.log

    def config_for(self, cls: type, ignore: tuple[str, ...] = (), **overrides):
        """A models/ config dataclass from this stage's params section; an unknown key fails with
        its path (models.profiles.config_from), keys the asset reads itself go in `ignore`."""
        return config_from(cls, self.params, STAGES[self.stage].section, ignore=ignore, **overrides)

    def path(self, asset: str) -> Path:
        """An asset's output under this run's data folder."""
        return output_path(self.settings, asset)


@dataclass
class Produced:
    """What an asset body returns: its metrics and what goes beside them."""

    metrics: dict[str, float]
    series: Optional[dict[str, list[float]]] = None
    metadata: Optional[dict[str, Any]] = None
    model_version: Optional[str] = None
    extra_rows: Optional[list[dict]] = None
    params: Optional[dict] = None     # recorded instead of the resolved params (what the body decided)


def pipeline_asset(name: str, config: type[dg.Config] | None = None, *,
                   upstream: Callable[[VasSettings, dict], list[str]] | None = None,
                   sources: Callable[[VasSettings, dict], Any] | None = None,
                   more_inputs: Callable[[VasSettings, dict], dict[str, str]] | None = None,
                   reusable: bool = True, on_reuse: Callable[[StageRun], Any] | None = None, **asset_args):
    """Decorate an asset body `def body(run: StageRun) -> Produced` into the Dagster asset `name`.

    config: the asset's launchpad config (its fields override the profile's section).
    upstream, sources: what this run reads, from its settings and params: the upstream assets
    when not all of the registry's (a user's file replaces them, say), and the imported files or
    model folders, hashed by content (lineage_inputs). more_inputs: further named md5s the
    output depends on (each shard of rollout_shards), in the lineage inputs and the re-use key.
    reusable=False always recomputes; on_reuse
    runs when the output on disk is re-used. asset_args go to dg.asset (group_name, kinds, ...).
    """
    stage = STAGES[name]

    def decorate(body: Callable[[StageRun], Produced]) -> dg.AssetsDefinition:
        def compute(context: dg.AssetExecutionContext, **kwargs) -> dg.MaterializeResult:
            settings, duckdb, run_config = kwargs["settings"], kwargs["duckdb"], kwargs.get("config")
            if "pytorch" in asset_args.get("kinds", ()):
                torch_threads(settings)
            profile = settings.params()
            overrides = run_config.model_dump() if run_config is not None else None
            params = resolve(profile, stage.section, overrides) if stage.section else {}
            for section in stage.also_params:  # e.g. the validation rules decide what is kept
                params[section] = profile[section]
            inputs = lineage_inputs(settings, upstream(settings, params) if upstream else stage.upstream,
                                    sources(settings, params) if sources else None)
            if more_inputs:
                inputs.update(more_inputs(settings, params))
            run = StageRun(context, settings, params, inputs, run_config, stage=name)
            if reusable and (reused := reuse(context, settings, duckdb, name, params, run.inputs)) is not None:
                if on_reuse:
                    on_reuse(run)
                return reused
            with LogToDagster(context):
                out = body(run)
            return finish(context, settings, duckdb, name, params if out.params is None else out.params,
                          out.metrics, inputs=run.inputs, series=out.series, metadata=out.metadata,
                          model_version=out.model_version, extra_rows=out.extra_rows)

        # Dagster reads the config schema and the resources from the signature.
        arguments = [inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                       annotation=dg.AssetExecutionContext)]
        if config:
            arguments.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=config))
        arguments += [inspect.Parameter("settings", inspect.Parameter.KEYWORD_ONLY, annotation=VasSettings),
                      inspect.Parameter("duckdb", inspect.Parameter.KEYWORD_ONLY, annotation=DuckDBResource)]
        compute.__signature__ = inspect.Signature(arguments, return_annotation=dg.MaterializeResult)
        compute.__name__ = compute.__qualname__ = name
        return dg.asset(name=name, deps=stage.upstream, code_version=code_version(name), **asset_args)(compute)

    return decorate
