"""The pipeline's stages, declared once: one entry per asset.

Everything that names an asset's output, inputs, parameters or code is derived from here: the
Dagster assets' deps and code versions (assets/), the lineage inputs and re-use key, the output
folders `vas generate` and `vas lineage` read, and dvc.yaml (tests/test_stages.py checks that
dvc.yaml's stages say exactly what these entries say).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from models.profiles import PROJECT_ROOT


@dataclass(frozen=True)
class Stage:
    name: str                       # the asset key and the dvc.yaml stage
    output: str                     # its one output under the data folder (a file or a folder)
    upstream: tuple[str, ...] = ()  # assets whose outputs it reads
    section: str | None = None      # its params.yaml section, resolved with the shared seed
    also_params: tuple[str, ...] = ()  # other params.yaml sections that decide its output
    code: tuple[str, ...] = ()      # the source files (or folders) it calls; code_files adds their imports
    versions: str | None = None     # folder under the data folder keeping every past output
    persist: bool = False           # the output accumulates across runs: DVC must not delete it first

    @property
    def params(self) -> list[str]:
        """The params.yaml keys the output depends on (dvc.yaml's `params:`)."""
        return (["seed", self.section] if self.section else []) + list(self.also_params)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("imported_preferences", "imported_preferences", also_params=("validation",), persist=True,
          code=("models/data/ingest.py", "models/data/validation", "assets/ingest.py")),
    Stage("corpus", "corpus/corpus.parquet", section="corpus",
          code=("models/data/corpus.py", "assets/synthesis.py")),
    Stage("base_model", "base_model", upstream=("corpus",), section="base_model",
          code=("models/lm/lm.py", "models/data/probe.py", "models/lm/real_model.py", "models/lm/sampling.py",
                "models/lm/train_utils.py", "assets/synthesis.py")),
    Stage("prompts", "prompts", upstream=("base_model",), section="prompts", also_params=("validation",),
          code=("models/data/corpus.py", "models/data/human_snippets.py", "models/rewards/rewards.py",
                "models/data/validation", "assets/synthesis.py", "assets/validation.py")),
    Stage("preference_pairs", "preference_pairs", upstream=("imported_preferences", "base_model", "prompts"),
          section="preference_pairs", also_params=("validation",),
          code=("models/data/preferences.py", "models/rewards/rewards.py", "models/lm/sampling.py", "models/lm/train_utils.py",
                "models/data/validation", "assets/synthesis.py", "assets/validation.py")),
    Stage("reward_models", "reward_models", upstream=("preference_pairs", "base_model"), section="reward_models",
          code=("models/rewards/reward_model.py", "models/lm/train_utils.py", "assets/rewards.py")),
    # Partitioned over prompt shards (rollouts.shards); one DVC stage samples every shard.
    Stage("rollout_shards", "rollout_shards", upstream=("base_model", "prompts"), section="rollouts",
          code=("models/data/rollouts.py", "models/lm/sampling.py", "models/lm/train_utils.py", "assets/rollouts.py")),
    # The shards merged in train-split order, scored by every reward.
    Stage("rollouts", "rollouts", upstream=("base_model", "prompts", "reward_models", "rollout_shards"),
          section="rollouts",
          code=("models/data/rollouts.py", "models/lm/sampling.py", "models/lm/train_utils.py", "models/data/validation",
                "assets/rollouts.py")),
    # A GPT-2 a fraction of the base model's size, on the base tokenizer: what value models start from.
    Stage("value_backbone", "value_backbone", upstream=("corpus", "base_model"), section="value_backbone",
          code=("models/lm/lm.py", "models/lm/train_utils.py", "assets/training.py")),
    # prompts: the human continuations of the snippets it cut (value_models.extra_human_continuations),
    # within the rollouts' token budget.
    Stage("value_models", "value_models",
          upstream=("rollouts", "base_model", "reward_models", "value_backbone", "prompts"),
          section="value_models", versions="value_model_versions", also_params=("rollouts",),
          code=("models/value/distributional.py", "models/data/human_continuations.py", "models/value/value_model.py",
                "models/value/value_store.py", "models/value/value_training.py", "models/value/td.py",
                "models/lm/train_utils.py", "models/decoding/reward_guidance.py", "models/rewards/reward_model.py",
                "models/value/distill.py", "assets/training.py")),
    Stage("evaluation", "eval", upstream=("base_model", "prompts", "reward_models", "value_models", "dpo_model"),
          section="evaluation",
          code=("models/evaluation/evaluation.py", "models/decoding/vas.py", "models/lm/sampling.py",
                "models/value/value_store.py", "models/lm/train_utils.py", "assets/evaluation.py")),
    Stage("value_error", "value_error", upstream=("base_model", "prompts", "reward_models", "value_models"),
          section="value_error", also_params=("rollouts",),   # its completion budget is the rollouts'
          code=("models/evaluation/value_error.py", "models/value/value_model.py", "models/value/value_store.py",
                "models/lm/sampling.py", "models/lm/train_utils.py", "models/decoding/reward_guidance.py",
                "assets/value_error.py")),
    Stage("dpo_model", "dpo_model", upstream=("preference_pairs", "base_model"), section="dpo",
          code=("models/evaluation/dpo.py", "assets/baselines.py")),
    Stage("report", "report", upstream=("evaluation", "value_error"), section="report",
          code=("models/evaluation/report.py", "assets/report.py")),
)}


def output_of(asset: str) -> str:
    """An asset's output path under the data folder."""
    return STAGES[asset].output


def _python_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _module_path(module: str, root: Path) -> str | None:
    """models.<concern>.x -> 'models/<concern>/x.py'; a package below a concern (models.data.validation)
    counts as one unit, its folder; models.<concern> alone is its __init__.py, and a top-level module
    models.x is 'models/x.py'. None for anything outside models/ or not a module (an imported name)."""
    parts = module.split(".")
    if parts[0] != "models" or len(parts) < 2:
        return None
    for depth in range(3, len(parts) + 1):                 # a package inside a concern: one unit
        if (root / "/".join(parts[:depth])).is_dir():
            return "/".join(parts[:depth])
    rel = "/".join(parts)
    if (root / f"{rel}.py").is_file():
        return f"{rel}.py"
    if len(parts) == 2 and (root / rel / "__init__.py").is_file():
        return f"{rel}/__init__.py"
    return None


def _models_imported_by(rel: str, root: Path) -> set[str]:
    """The models/ modules a source file (or every file of a folder) imports, at any depth of the file."""
    found: set[str] = set()
    for file in _python_files(root / rel):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from models import targets` names a module too
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            found.update(path for name in names if (path := _module_path(name, root)) and path != rel)
    return found


def code_files(listed: Iterable[str], root: Path = PROJECT_ROOT) -> list[str]:
    """A stage's code: the files it lists, then every models/ module those import, transitively, so
    an edit to a helper two imports away still counts. Imports are followed from models/ files
    only: an asset module's own plumbing (assets/common.py, the registry, params resolution) decides
    how a stage runs and what lineage records, not what it computes."""
    listed = list(listed)
    seen, todo = set(listed), [p for p in listed if p.startswith("models/")]
    while todo:
        for path in sorted(_models_imported_by(todo.pop(), root) - seen):
            seen.add(path)
            todo.append(path)
    return listed + sorted(seen - set(listed))


def code_hash(paths: Iterable[str], root: Path) -> str:
    """Hash of source files under root (a folder counts as the .py files in it), by path and content."""
    digest = hashlib.sha256()
    for rel in paths:
        path = root / rel
        if not path.exists():
            raise FileNotFoundError(f"{rel}, listed as code in models/stages.py, does not exist under {root}")
        for file in _python_files(path):
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def code_version(asset: str) -> str:
    """The asset's code version: a hash of its stage's code files (dvc.yaml's code deps for that
    stage), so an edit recomputes the assets that run that code and re-uses the rest."""
    return code_hash(code_files(STAGES[asset].code), PROJECT_ROOT)


def dvc_stage(stage: Stage, dagster_home: str = "${dagster_home}") -> dict:
    """The dvc.yaml stage this entry describes: materialize the asset through Dagster; its deps
    are its upstream outputs, then its code; its params are the `default` profile's."""
    entry: dict = {
        "cmd": f"DAGSTER_HOME=$PWD/{dagster_home} vas materialize {stage.name} --profile default",
        "deps": [f"data/{STAGES[up].output}" for up in stage.upstream] + code_files(stage.code),
    }
    if stage.params:
        entry["params"] = [f"default.{key}" for key in stage.params]
    out = f"data/{stage.output}"
    entry["outs"] = [{out: {"persist": True}} if stage.persist else out]
    return entry
