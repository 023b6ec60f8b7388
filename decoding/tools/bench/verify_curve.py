"""The --verify-curve section: the time of one forward (and the logits of every row) over
k new tokens at a fixed context. A speculative step drafting k - 1 tokens pays this; tree
calibration ranks trees with it. The measurement is engine/step_costs.py's, which
`--tree auto` uses at the engine's first start too.
"""

from __future__ import annotations

from ...engine.step_costs import verify_times

__all__ = ["verify_curve"]

verify_curve = verify_times
