"""Emit: a sequence's accepted tokens become the `RequestOutput` delta a client sees.

Tokens are appended one at a time so every stop condition is exact: EOS, stop token ids,
stop strings (text held back until it cannot start one, see stop.py) and max_tokens.
Nothing past the stop point is emitted or counted. Here too: incremental detokenization,
releasing held-back text at the end, logprobs of the emitted tokens, finish reasons, and
finishing the request (through the engine's `finish`, which frees its slot).
"""

from __future__ import annotations

from typing import Callable

import torch

from .commit import Verdict
from .outputs import RequestOutput, TokenLogprob
from .scheduler import Sequence


def request_output(seq: Sequence, tokens: list[int], text: str, reason: str | None,
                   stop_reason: str | int | None = None, error: str | None = None
                   ) -> RequestOutput:
    """The delta of `seq` carrying `tokens` / `text`; finished when `reason` is set."""
    return RequestOutput(
        request_id=seq.request_id,
        new_token_ids=tokens,
        new_text=text,
        num_prompt_tokens=seq.prompt_len,
        num_output_tokens=seq.num_emitted,
        finished=reason is not None,
        finish_reason=reason,
        stop_reason=stop_reason,
        spec=seq.spec,
        error=error,
    )


class OutputProcessor:
    """Appends accepted tokens to their sequence and builds its output."""

    def __init__(self, eos_ids: set[int], finish: Callable[[Sequence], None]) -> None:
        self.eos_ids = eos_ids
        self.finish = finish  # the engine's: leave the scheduler, free the slot
        self.generated_tokens = 0  # emitted over the engine's life (EngineStats)

    def emit(self, seq: Sequence, verdict: Verdict) -> RequestOutput:
        """Append tokens one by one, honouring EOS, stop ids, stop strings and max_tokens
        exactly: nothing past the stop point is emitted or counted."""
        p = seq.params
        kept: list[int] = []
        text_parts: list[str] = []
        reason: str | None = None
        stop_reason: str | int | None = None
        for tok in verdict.tokens:
            kept.append(tok)
            seq.token_ids.append(tok)
            seq.num_emitted += 1
            piece = seq.detok.add([tok])
            if seq.stops is not None:
                piece, hit, matched = seq.stops.feed(piece)
                text_parts.append(piece)
                if hit:
                    reason, stop_reason = "stop", matched
                    break
            else:
                text_parts.append(piece)
            if tok in p.stop_token_ids:
                reason, stop_reason = "stop", tok
            elif tok in self.eos_ids and not p.ignore_eos:
                reason = "stop"
            elif seq.num_emitted >= p.max_tokens:
                reason = "length"
            if reason is not None:
                text_parts.append(self.flush_text(seq))
                break
        self.generated_tokens += len(kept)
        logprobs = (self.logprobs(verdict.logits, verdict.path, kept, p.logprobs)
                    if p.logprobs is not None else None)
        if reason is not None:
            self.finish(seq)
        out = request_output(seq, kept, "".join(text_parts), reason, stop_reason)
        out.logprobs = logprobs
        return out

    @staticmethod
    def flush_text(seq: Sequence) -> str:
        """End of generation without a stop string: release held-back text."""
        tail = seq.detok.flush()
        if seq.stops is None:
            return tail
        tail, hit, _ = seq.stops.feed(tail)
        return tail if hit else tail + seq.stops.flush()

    @staticmethod
    def logprobs(logits: torch.Tensor, path: list[int], kept: list[int], k: int
                 ) -> list[TokenLogprob]:
        """Raw-model logprobs of each emitted token; row path[i] predicted token i."""
        rows = torch.tensor(path[:len(kept)], device=logits.device)
        lp = torch.log_softmax(logits[rows].float(), dim=-1)
        chosen = lp.gather(1, torch.tensor(kept, device=lp.device)[:, None])[:, 0].tolist()
        k = min(k, lp.shape[-1])
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        tv, ti = top_v.tolist(), top_i.tolist()
        return [TokenLogprob(t, c, list(zip(ti[i], tv[i])))
                for i, (t, c) in enumerate(zip(kept, chosen))]
