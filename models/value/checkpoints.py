"""Training checkpoints: model weights (safetensors), optimizer state and progress, written
atomically, and restored only when they were made for the same data and settings (a fingerprint).
A killed training resumes from the last one to the same weights."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def save_checkpoint(directory: Path, model, optimizer, step: int, losses: list[float], fingerprint: str) -> None:
    from safetensors.torch import save_file

    from models.artifacts import atomic_path

    frozen = _frozen(model)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in frozen}
        save_file(state, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses, "fingerprint": fingerprint}))


def _frozen(model) -> set[str]:
    """Parameters that are not trained (a frozen backbone): not checkpointed, they never change."""
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def load_checkpoint(directory: Path, model, optimizer, fingerprint: str, device) -> tuple[int, list[float]]:
    """Restore (step, losses) from a matching checkpoint; (0, []) when there is none."""
    from safetensors.torch import load_file

    progress_file = directory / "progress.json"
    if not progress_file.exists():
        return 0, []
    progress = json.loads(progress_file.read_text())
    if progress["fingerprint"] != fingerprint:
        log.info(f"ignoring checkpoint in {directory}: it was made for other data or settings")
        return 0, []
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors"), device=str(device)),
                                                strict=False)
    if unexpected or set(missing) - _frozen(model):
        raise RuntimeError(f"checkpoint in {directory} does not fit the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    # Optimizer state is tensors and numbers only, so the safe loader suffices.
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
    return int(progress["step"]), list(progress["losses"])


def clear_checkpoint(checkpoint_dir: str | Path) -> None:
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
