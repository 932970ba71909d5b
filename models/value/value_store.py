"""The value_models folder: one saved value model per (attribute, parameterization), each with a
vas_value.json saying what it is (attribute, parameterization, reward, reward_stats...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

META_FILE = "vas_value.json"
# value_models params the value_models asset reads itself; the rest configure ValueTrainConfig.
VALUE_MODELS_OWN_KEYS = ("extra_parameterizations", "extra_attributes", "extra_train_steps", "backbone_init",
                         "backbone", "head_init", "extra_config", "distill_from", "distill",
                         "default_parameterization", "extra_human_continuations")
# The parameterization vas_value.json names for a per-token head distilled from another value model
# (value_models.distill_from; models/value/distill.py), saved as <attribute>.distilled (or as <attribute>
# where value_models.default_parameterization names it).
DISTILLED = "distilled"


def value_model_name(attribute: str, parameterization: str, default: str) -> str:
    """Folder of a value model under data/value_models: the attribute itself for the attribute's
    default parameterization (what `vas generate --weight <attribute>=W` and `vas serve` steer
    with), attribute.param for the others."""
    return attribute if parameterization == default else f"{attribute}.{parameterization}"


def default_parameterization(trained: list[str], primary: str, preferred: str) -> str:
    """The parameterization an attribute's plain name answers to: `preferred`
    (value_models.default_parameterization) where that attribute has it, else the primary."""
    return preferred if preferred in trained else primary


def saved_value_models(root: str | Path) -> list[tuple[Path, dict]]:
    """(folder, its vas_value.json) of every value model under root, by name; hidden folders
    (half-written atomic temporaries) are skipped."""
    from models.artifacts import visible_subfolders  # pandas: `vas --help` starts without it

    return [(folder, json.loads((folder / META_FILE).read_text())) for folder in visible_subfolders(root)]


def value_model_folder(root: str | Path, attribute: str, parameterization: str) -> Path:
    """The folder under root of the value model saved for (attribute, parameterization), by its
    vas_value.json rather than by folder name: which one answers to the attribute's plain name is
    the profile's choice (value_models.default_parameterization)."""
    saved = saved_value_models(root)
    for folder, meta in saved:
        if meta["attribute"] == attribute and meta["parameterization"] == parameterization:
            return folder
    have = ", ".join(f"{f.name} ({m['attribute']}, {m['parameterization']})" for f, m in saved) or "none"
    raise FileNotFoundError(f"no {parameterization} value model for {attribute} under {root}; saved: {have}")


def find_value_models(root: str | Path, overrides: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Saved value models by folder name (what `vas generate` weights name): every folder under
    root holding a saved value model, then explicit folders."""
    from models.artifacts import visible_subfolders
    from models.value.value_model import CONFIG_FILE  # torch-backed: only when looking for models

    found = {p.name: p for p in visible_subfolders(root) if (p / CONFIG_FILE).exists()}
    found.update({name: Path(p) for name, p in (overrides or {}).items()})
    return found


def load_value_models(root: str | Path, device="cpu", base_model=None) -> dict[str, dict]:
    """parameterization -> attribute -> ValueModel (in eval mode), from a value_models folder.
    base_model: the frozen base, whose body value models with a frozen copy of it share."""
    from models.value.value_model import ValueModel

    found: dict[str, dict] = {}
    for folder, meta in saved_value_models(root):
        found.setdefault(meta["parameterization"], {})[meta["attribute"]] = ValueModel.load(
            folder, device=device, base_model=base_model)
    return found
