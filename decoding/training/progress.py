"""What a training run shows while it runs and when it ends: the step progress bar (tqdm
when installed) and the per-head held-out accuracy lines.

Why a module of its own: every mode prints the same way, and tests stop a run mid-way
by patching `ProgressBar.update` (the one place every training loop reports a step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class ProgressBar:
    """tqdm when installed, else a log line every ~5% of the steps."""

    def __init__(self, total: int, initial: int) -> None:
        self.total, self.last = total, initial
        try:
            from tqdm import tqdm

            self.t = tqdm(total=total, initial=initial, desc="train heads", dynamic_ncols=True)
        except ImportError:
            self.t = None

    def update(self, step: int, text: str) -> None:
        if self.t is not None:
            self.t.update(step - self.last)
            self.t.set_postfix_str(text, refresh=False)
        elif step == self.total or step % max(1, self.total // 20) == 0:
            log.info("step %d/%d %s", step, self.total, text)
        self.last = step

    def close(self) -> None:
        if self.t is not None:
            self.t.close()


def say_heldout(say: Callable[[str], None], full: dict, draft: dict | None) -> None:
    """One line per head: held-out top-1/top-5 over the full vocabulary (`full`, an
    `evaluate` report) and, when given, over the draft vocabulary (`draft`)."""
    for k in range(len(full["top1"])):
        line = f"head {k + 1}: held-out top-1 {full['top1'][k]:.3f} top-5 {full['top5'][k]:.3f}"
        if draft:
            line += (f" | draft vocab ({draft['vocab']}) top-1 {draft['top1'][k]:.3f} top-5 "
                     f"{draft['top5'][k]:.3f}, targets inside {draft['in_vocab'][k]:.3f}")
        say(line)
