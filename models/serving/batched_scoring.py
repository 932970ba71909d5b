"""The learned-reward scores of `vas serve`'s responses, batched across the requests that finish
close together, on the scheduler's thread (models/serving/scheduler.py)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Sequence

from models.serving.scheduler import Scheduler


class BatchedScoring:
    """score(prompts, completions) -> {reward: scores}, with the texts of every caller waiting at
    once scored in one call, on the scheduler's thread between two decode steps (Scheduler.soon):
    the requests that finish close together in the running batch are scored in one forward per
    reward model, not one each, and no second thread competes with the decode for the interpreter."""

    def __init__(self, score, scheduler: Scheduler):
        self.score, self.scheduler = score, scheduler
        self.waiting: list[tuple[list, list, Future]] = []
        self._lock = threading.Lock()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, list[float]]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        future = Future()
        with self._lock:
            self.waiting.append((list(prompts), list(completions), future))
            first = len(self.waiting) == 1      # else a drain is already due to take this one too
        if first:
            self.scheduler.soon(self._drain)
        return future.result()

    def _drain(self) -> None:
        with self._lock:
            calls, self.waiting = self.waiting, []
        try:
            scores = self.score([p for ps, _, _ in calls for p in ps], [c for _, cs, _ in calls for c in cs])
        except Exception as err:
            for _, _, future in calls:
                future.set_exception(err)
            return
        start = 0
        for prompts, _, future in calls:
            future.set_result({name: list(values[start:start + len(prompts)]) for name, values in scores.items()})
            start += len(prompts)
