"""Which ops of a step give a row the same bits whatever else shares the pass.

For each op on the default model's shapes, row i's output computed in a pass of M=1 rows
is compared BITWISE with the same row computed inside passes of M = 2, 4, 8, 12, 16, 32,
64 (and a prefill-sized 300) rows (the other rows random). A cell is "=" where every row
of that pass equals its one-row result, else the number of rows that differ. Attention
compares one query row (a decode step, keys [0, pos]) with the same row as a node of a
draft tree (its ancestors interleaved with masked siblings) and beside other sequences of
other lengths (padded keys).

    python benchmarks/row_invariance.py [--ms 2,4,8,12,16,32,64,300]

Run single-threaded or not, the table is for this machine's kernels; the unit test
tests/decoding/test_batch_invariance.py checks the rule for the kernels the invariant
mode uses.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mtpserve.decoding.model import attention as attn
from mtpserve.decoding.model.attention_metadata import AttentionMetadata
from mtpserve.decoding.model.linear import Linear, onednn_linear, pack_for_onednn
from mtpserve.decoding.model.trunk import RMSNorm, RotaryEmbedding

H, INTER, V, HQ, HKV, D = 576, 1536, 49152, 9, 3, 64


def _rows(fn, k_in: int, ms: list[int], dtype=torch.float32, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(ms), k_in, generator=g).to(dtype)
    single = torch.cat([fn(x[i:i + 1]) for i in range(max(ms))])
    cells = []
    for m in ms:
        got = fn(x[:m])
        bad = int((got != single[:m]).reshape(m, -1).any(-1).sum())
        cells.append("=" if bad == 0 else str(bad))
    return cells


def _linear(k_in: int, n_out: int, fmt: str, seed: int = 1) -> Linear:
    lin = Linear(k_in, n_out, bias=False)
    lin.set_weight(torch.randn(n_out, k_in, generator=torch.Generator().manual_seed(seed)) * 0.05)
    if fmt == "int4":
        lin.quantize_int4(wide_copy=True)
    elif fmt == "int8":
        lin.quantize_int8(wide_copy=True)
    return lin


def linear_rows(ms: list[int]) -> list[tuple[str, list[str]]]:
    from mtpserve.decoding.model import linear as L

    out = []
    for k_in, n_out, name in ((H, 3072, "gate_up"), (INTER, H, "down")):
        lin4 = _linear(k_in, n_out, "int4")
        out.append((f"int4 kernel {name} (always)", _rows(lin4._int4_mm, k_in, ms, torch.bfloat16)))
        saved = L.WIDE_ROWS
        out.append((f"int4 Linear {name} (wide from {saved})", _rows(lin4, k_in, ms)))
        if lin4.wide_weight is not None:
            out.append((f"bf16 wide copy {name} (always)",
                        _rows(lambda x: onednn_linear(x, lin4.wide_weight), k_in, ms, torch.bfloat16)))
        lin8 = _linear(k_in, n_out, "int8")
        out.append((f"int8 kernel {name} (always)", _rows(lin8._int8_mm, k_in, ms, torch.bfloat16)))
        w = torch.randn(n_out, k_in, generator=torch.Generator().manual_seed(3)) * 0.05
        for dt in (torch.float32, torch.bfloat16):
            p = pack_for_onednn(w.to(dt))
            if p is not None:
                out.append((f"{str(dt)[6:]} oneDNN packed {name}",
                            _rows(lambda x: onednn_linear(x, p), k_in, ms, dt)))
        out.append((f"fp32 F.linear {name}", _rows(lambda x: F.linear(x, w), k_in, ms)))
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(V, H, generator=g) * 0.05
    p = pack_for_onednn(emb, batch_hint=16)
    if p is not None:
        out.append(("fp32 unembedding (oneDNN packed)", _rows(lambda x: onednn_linear(x, p), H, ms)))
    out.append(("fp32 unembedding W @ h^T", _rows(lambda x: torch.mm(emb, x.t()).t(), H, ms)))
    return out


def elementwise_rows(ms: list[int]) -> list[tuple[str, list[str]]]:
    norm = RMSNorm(H, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(H) + 0.5)
    cos, sin = torch.randn(1, 1, D // 2), torch.randn(1, 1, D // 2)  # one position for all
    rot = lambda x: RotaryEmbedding.apply(x.view(-1, 12, D), cos, sin)  # noqa: E731
    return [
        ("RMSNorm fp32 (F.rms_norm)", _rows(norm, H, ms)),
        ("rotary (q and k heads)", _rows(lambda x: rot(x).reshape(len(x), -1), 12 * D, ms)),
        ("silu(gate) * up", _rows(lambda x: F.silu(x[:, :INTER]) * x[:, INTER:], 2 * INTER, ms)),
        ("exp, odd width 37", _rows(torch.exp, 37, ms)),
        ("softmax, width 37", _rows(lambda x: torch.softmax(x, -1), 37, ms)),
    ]


def _meta(mask: torch.Tensor, kv_len: int, counts: list[int]) -> AttentionMetadata:
    from mtpserve.decoding.model.attention_metadata import padded_layout

    B = len(counts)
    qg, qs = padded_layout(counts)
    e = torch.empty(0, dtype=torch.long)
    return AttentionMetadata(positions=e, token_slots=e, token_store=e,
                             seq_slots=torch.arange(B), slot_start=0, kv_len=kv_len, num_seqs=B,
                             q_len=max(counts), q_gather=qg, q_scatter=qs, mask=mask)


def attention_cases(attend) -> dict[str, bool]:
    """attend(q [T, Hq, D], k, v [B, Hkv, L, D], meta, scale). The reference: one decode row
    at position pos over keys [0, pos] (contiguous, no mask). Compared with: the same row as
    the deepest node of a tree whose siblings sit between its ancestors; the same row among
    other decode rows with longer/shorter contexts (padded keys, mask)."""
    g = torch.Generator().manual_seed(7)
    start, scale = 141, D ** -0.5
    slot_len = start + 40
    kv = torch.randn(2, 4, HKV, slot_len, D, generator=g)  # [k/v, slot, h, idx, D]
    q = torch.randn(HQ, D, generator=g)
    res = {}
    # the chain start..start+3 committed, the query at pos start+3
    pos = start + 3
    ref = attend(q[None], kv[0, :1, :, :pos + 1], kv[1, :1, :, :pos + 1],
                 _meta(None, pos + 1, [1]), scale)
    # tree: root (start), decoy child (start+1), true child (start+2), decoy grandchild
    # (start+3), true grandchild (start+4), query node (start+5) under the true grandchild;
    # the true path's K/V sit at start, start+2, start+4, start+5
    tk, tv = kv[0, 1:2].clone(), kv[1, 1:2].clone()
    tk[:, :, :start], tv[:, :, :start] = kv[0, 0, :, :start], kv[1, 0, :, :start]
    for d, idx in enumerate([start, start + 2, start + 4, start + 5]):
        tk[:, :, idx], tv[:, :, idx] = kv[0, 0, :, start + d], kv[1, 0, :, start + d]
    n, L = 6, start + 6
    parents = [-1, 0, 0, 2, 2, 4]
    own = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            own[i, j] = True
            j = parents[j]
    mask = torch.zeros(1, 1, n, L, dtype=torch.bool)
    mask[0, 0, :, :start] = True
    mask[0, 0, :, start:] = own
    qs = torch.randn(n, HQ, D, generator=g)
    qs[5] = q
    out = attend(qs, tk[:, :, :L], tv[:, :, :L], _meta(mask, L, [n]), scale)
    res["tree node (decoys between ancestors)"] = torch.equal(out[5], ref[0])
    # beside two other decode rows with longer and shorter contexts
    ks, vs = kv[0, :3].clone(), kv[1, :3].clone()
    ks[1], vs[1] = kv[0, 0], kv[1, 0]
    lens = [start + 20, pos + 1, start - 30]
    L = max(lens)
    mask = torch.zeros(3, 1, 1, L, dtype=torch.bool)
    for b, ln in enumerate(lens):
        mask[b, 0, 0, :ln] = True
    qs = torch.randn(3, HQ, D, generator=g)
    qs[1] = q
    out = attend(qs, ks[:, :, :L], vs[:, :, :L], _meta(mask, L, [1, 1, 1]), scale)
    res["decode row beside longer/shorter rows"] = torch.equal(out[1], ref[0])
    return res


def _invariant(q, k, v, meta, scale):
    """attend_invariant over a one-layer cache holding k, v [B, Hkv, L, D]."""
    from mtpserve.decoding.model.kv_cache import KVCache

    kv = KVCache.__new__(KVCache)
    kv.buf = torch.stack([k, v])[None]
    return attn.attend_invariant(q, kv, 0, meta, scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="2,4,8,12,16,32,64,300")
    a = ap.parse_args()
    ms = [int(m) for m in a.ms.split(",")]
    torch.manual_seed(0)
    rows = linear_rows(ms) + elementwise_rows(ms)
    w = max(len(r[0]) for r in rows)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'op (row i at M=1 vs inside M rows)':<{w}} | " + " ".join(f"{m:>4}" for m in ms))
    print("-" * (w + 3 + 5 * len(ms)))
    for name, cells in rows:
        print(f"{name:<{w}} | " + " ".join(f"{c:>4}" for c in cells))
    print()
    for label, fn in (("SDPA (attend)", attn.attend), ("attend_invariant", _invariant)):
        for case, ok in attention_cases(fn).items():
            print(f"{label}: {case}: {'=' if ok else 'DIFFERS'}")


if __name__ == "__main__":
    main()
