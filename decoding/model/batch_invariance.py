"""`--batch-invariant auto|on|off`: whether a row's result may depend on the other rows of
the pass, decided once at load.

`on` sets the mode (CausalLM.set_batch_invariant: every kernel checked against the row
rule, linear.row_invariant); `auto` (the default) turns it on only where it costs nothing:
decode and tree rows attend through the row kernel (invariant by construction) and every
projection is quantized with no bf16 wide copy (the mode's one change would be giving
that copy up for prefill), which is the CPU default with `--int4-kernel vnni16`.
"""

from __future__ import annotations

import logging

from .linear import Linear
from .trunk import CausalLM

log = logging.getLogger(__name__)


def invariant_for_free(model: CausalLM) -> bool:
    """What `auto` asks: the row attention kernel, and quantized layers without wide copies.
    The unembedding is checked by set_batch_invariant like every kernel."""
    return model.attention_kernel == "rows" and all(
        m.weight_format != "dense" and m.wide_weight is None
        for m in model.layers.modules() if isinstance(m, Linear))


def apply_batch_invariant(model: CausalLM, mode: str) -> bool:
    """Set the mode for `mode` (auto|on|off) after the attention kernel is chosen; returns
    whether it is on. A kernel failing the row rule turns auto off (logged) and makes on
    warn (the guarantee would not hold)."""
    on = mode == "on" or (mode == "auto" and invariant_for_free(model))
    failing = model.set_batch_invariant(on)
    if failing and mode == "auto":
        model.set_batch_invariant(False)
        log.info("--batch-invariant auto: off (%s is not row-invariant here)", failing[0])
        return False
    if failing:
        log.warning("--batch-invariant on: %d kernels of this weight format / device are not "
                    "row-invariant here (%s, ...): outputs may still depend on the batch",
                    len(failing), failing[0])
    elif mode == "auto":
        log.info("--batch-invariant auto: %s", "on (greedy output with speculation equals it "
                 "without)" if on else "off (it would cost speed here)")
    return on
