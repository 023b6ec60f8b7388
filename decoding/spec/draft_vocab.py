"""Draft vocabulary pieces shared by every head type that can draft from a subset of the
vocabulary (FR-Spec style): the tensor's key in heads.safetensors, its validation, and the
cached slice of unembedding rows that drafting scores.

Its own leaf module so that the head layouts (heads.py for Medusa, mtp_sequential.py) and
the heads folder reader/writer (heads_io.py) share them without importing each other.
"""

from __future__ import annotations

import torch

DRAFT_VOCAB_KEY = "draft_vocab"  # optional int64 tensor in heads.safetensors


class UnembedRows:
    """Rows `ids` of an unembedding, copied once and rebuilt only when the weight (storage,
    device, dtype, shape) or the ids change: drafting reads them every step."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self.rows: torch.Tensor | None = None

    def get(self, src: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        key = (src.data_ptr(), src.device, src.dtype, src.shape, ids.data_ptr(), ids.device)
        if key != self._key:
            with torch.no_grad():
                self.rows = src.detach().index_select(0, ids.to(src.device)).contiguous()
            self._key = key
        return self.rows


def check_draft_vocab(ids: torch.Tensor, vocab_size: int, where: str) -> torch.Tensor:
    """A draft vocabulary as int64, or a ValueError naming `where`."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{where}: draft_vocab must be a non-empty 1-D tensor of token ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{where}: draft_vocab must hold integer token ids, not {ids.dtype}")
    ids = ids.to(torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where}: draft_vocab holds token id {bad}, outside the model's "
                         f"vocabulary of {vocab_size}")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError(f"{where}: draft_vocab must be sorted and without repeats")
    return ids
