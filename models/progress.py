"""Progress a person can see: tqdm bars with rate and ETA on the long loops (base-model, reward and
value training steps, sampling batches, which every evaluation row and Best-of-N candidate runs,
distillation, the value error's continuations, the seed study), for `vas run`, `vas study` and the
benches in a terminal.

A bar is drawn beside the log lines each loop writes, never instead of them: the Dagster run log
keeps its lines, and a run launched from the UI or the daemon (stderr not a terminal) draws none.
VAS_PROGRESS picks: "auto" (bars when stderr is a terminal), "on" (always) or "off" (never). The
`vas` CLI decides "auto" once when it starts (decide_auto): inside a Dagster step stderr is the
compute-log capture, never a terminal, and the capture mirrors what is drawn to the terminal.
"""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

from models.environment import read_env, set_env

MODES = ("auto", "on", "off")


def progress_mode() -> str:
    mode = read_env().progress.strip().lower()
    if mode not in MODES:
        raise ValueError(f"VAS_PROGRESS must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def bars_enabled() -> bool:
    mode = progress_mode()
    return mode == "on" or (mode == "auto" and sys.stderr.isatty())


def decide_auto() -> None:
    """Turn VAS_PROGRESS=auto into on or off by whether stderr is a terminal now (a bad value fails
    here, at the start, not deep in a step); for this process and the ones it starts."""
    if progress_mode() == "auto":
        set_env(progress="on" if sys.stderr.isatty() else "off")


def progress_bar(iterable: Iterable | None = None, desc: str = "", total: int | None = None, unit: str = "it",
                 initial: int = 0, enabled: bool = True) -> tqdm:
    """A bar over an iterable (`for step in progress_bar(range(n), "value training", unit="step")`),
    or over `total` units updated by hand (.update(n), as a context manager). When bars are off it is
    tqdm's disabled bar: the iterable passes through untouched. Inner bars (a sampling call inside an
    evaluation row) vanish when done, so a terminal keeps one line per running loop. enabled=False:
    never drawn (the ranks other than the first of a distributed run, which share the terminal)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, disable=not (enabled and bars_enabled()),
                leave=False, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
