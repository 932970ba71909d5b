"""The value_models folder: one saved value model per (attribute, parameterization), each with a
vas_value.json saying what it is (attribute, parameterization, reward, reward_stats...)."""

from __future__ import annotations

import json
from pathlib import Path

META_FILE = "vas_value.json"


def value_model_name(attribute: str, parameterization: str, primary: str) -> str:
    """Folder of a value model under data/value_models: the attribute for the primary
    parameterization (what `vas generate` uses by default), attribute.param for the others."""
    return attribute if parameterization == primary else f"{attribute}.{parameterization}"


def saved_value_models(root: str | Path) -> list[tuple[Path, dict]]:
    """(folder, its vas_value.json) of every value model under root, by name; hidden folders
    (half-written atomic temporaries) are skipped."""
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(folder, json.loads((folder / META_FILE).read_text())) for folder in folders]


def load_value_models(root: str | Path, device="cpu") -> dict[str, dict]:
    """parameterization -> attribute -> ValueModel (in eval mode), from a value_models folder."""
    from models.value_model import ValueModel

    found: dict[str, dict] = {}
    for folder, meta in saved_value_models(root):
        found.setdefault(meta["parameterization"], {})[meta["attribute"]] = ValueModel.load(folder, device=device)
    return found
