"""MTP head layouts on tiny float64 random models: Meta-style parallel heads (params.json +
extra_heads.*) and sequential DeepSeek-V3 / MiMo modules (num_nextn_predict_layers).

Each test writes its tiny checkpoint in the real on-disk layout. Checked: loading and the
refusals of heads that do not fit; greedy speculative == plain greedy with these (random)
heads; and the drafts themselves against references written here from the papers'
algorithms (Meta: a full causal forward of extra block k over h_trunk in Meta's own
rotary convention; sequential: the module chain, over the draft chain alone (chain mode)
or over every committed position too (context mode, as vLLM runs them)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from decoding_helpers import greedy, random_causal_lm, run_requests, tiny_config
from mtpserve.decoding.model.attention_metadata import AttentionMetadata
from mtpserve.decoding.config import EngineConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.spec.heads_io import load_heads
from mtpserve.decoding.model.kv_cache import KVCache
from mtpserve.decoding.spec.mtp_parallel import ParallelMTPHeads
from mtpserve.decoding.spec.mtp_sequential import SequentialMTPHeads
from mtpserve.decoding.spec.tree import DraftTree

V, H, LAYERS = 256, 32, 2
PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [30, 31], [5, 6, 7, 5, 6, 7, 5, 6, 7, 5], [42]]
MAX = 20


class ByteTok:
    """Just what the engine needs of a tokenizer: EOS ids and decode."""

    vocab_size = V
    eos_token_ids: tuple[int, ...] = ()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


def _cfg(**kw):
    return tiny_config(vocab=V, hidden=H, layers=LAYERS, heads=4, kv_heads=2,
                       tie_word_embeddings=False, **kw)


@pytest.fixture(scope="module")
def model():
    return random_causal_lm(_cfg(), torch.float64, seed=3)


def _engine(model, heads=None, tree="tree16"):
    if heads is not None:
        heads = heads.to(torch.float64).eval()
    cfg = EngineConfig(dtype="float64", device="cpu", max_num_seqs=4, max_model_len=128,
                       spec=SpecConfig(mode="on", proposer="heads" if heads else "ngram",
                                       tree=tree))
    return LLMEngine(cfg, model, ByteTok(), "tiny", heads=heads)


@pytest.fixture(scope="module")
def plain_ref(model):
    eng = _engine(model)
    runs = run_requests(eng, [(p, greedy(MAX, ignore_eos=True, speculate=False))
                              for p in PROMPTS])
    return [r.token_ids for r in runs]


# Values exact in float32 (heads are built in float32, then moved to float64), kept float64.
def _rand(g, *shape, scale=None):
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (t * (scale if scale is not None else 1 / math.sqrt(shape[-1]))).float().double()


def _norm(g, n):
    return (1 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)).float().double()


# -- checkpoint writers (the real layouts) ----------------------------------------------------
def write_meta(folder, cfg, n_future=4, seed=0, fmt="pth", params=None):
    """params.json + consolidated.00.pth (or .safetensors): trunk tensors (ignored by the
    loader) and extra_heads.{i}.* in Meta's naming and rotary layout."""
    g = torch.Generator().manual_seed(seed)
    H, V = cfg.hidden_size, cfg.vocab_size
    D, I = cfg.head_dim, cfg.intermediate_size
    t = {"tok_embeddings.weight": _rand(g, 8, H), "norm.weight": _norm(g, H),
         "layers.0.attention.wq.weight": _rand(g, 4, H), "output.weight": _rand(g, 8, H)}
    for i in range(n_future - 1):
        p = f"extra_heads.{i}."
        t |= {p + "attention.wq.weight": _rand(g, cfg.num_heads * D, H),
              p + "attention.wk.weight": _rand(g, cfg.num_kv_heads * D, H),
              p + "attention.wv.weight": _rand(g, cfg.num_kv_heads * D, H),
              p + "attention.wo.weight": _rand(g, H, cfg.num_heads * D),
              p + "feed_forward.w1.weight": _rand(g, I, H),
              p + "feed_forward.w3.weight": _rand(g, I, H),
              p + "feed_forward.w2.weight": _rand(g, H, I),
              p + "attention_norm.weight": _norm(g, H), p + "ffn_norm.weight": _norm(g, H)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(
        {"dim": H, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads,
         "n_kv_heads": cfg.num_kv_heads, "vocab_size": V, "multiple_of": 16,
         "norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
         "n_future_tokens": n_future} | (params or {})))
    if fmt == "pth":
        torch.save(t, folder / "consolidated.00.pth")
    else:
        from safetensors.torch import save_file
        save_file(t, str(folder / "consolidated.safetensors"))
    return t


def _block(g, cfg, p):
    D, I, H = cfg.head_dim, cfg.intermediate_size, cfg.hidden_size
    return {p + "input_layernorm.weight": _norm(g, H),
            p + "self_attn.q_proj.weight": _rand(g, cfg.num_heads * D, H),
            p + "self_attn.k_proj.weight": _rand(g, cfg.num_kv_heads * D, H),
            p + "self_attn.v_proj.weight": _rand(g, cfg.num_kv_heads * D, H),
            p + "self_attn.o_proj.weight": _rand(g, H, cfg.num_heads * D),
            p + "post_attention_layernorm.weight": _norm(g, H),
            p + "mlp.gate_proj.weight": _rand(g, I, H), p + "mlp.up_proj.weight": _rand(g, I, H),
            p + "mlp.down_proj.weight": _rand(g, H, I)}


def write_sequential(folder, cfg, style="deepseek", n=1, seed=0, shared_head=False, config=None):
    """config.json with num_nextn_predict_layers + model.safetensors holding trunk tensors
    (ignored) and the modules: model.layers.{L+i}.* (DeepSeek) or model.mtp_layers.{i}.* (MiMo)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    L, H, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    t = {"model.embed_tokens.weight": _rand(g, V, H), "model.norm.weight": _norm(g, H),
         "model.layers.0.input_layernorm.weight": _norm(g, H)}
    for i in range(n):
        if style == "deepseek":
            p = f"model.layers.{L + i}."
            t |= {p + "enorm.weight": _norm(g, H), p + "hnorm.weight": _norm(g, H),
                  p + "eh_proj.weight": _rand(g, H, 2 * H)}
            if shared_head:
                t |= {p + "shared_head.norm.weight": _norm(g, H),
                      p + "shared_head.head.weight": _rand(g, V, H, scale=0.5)}
        else:
            p = f"model.mtp_layers.{i}."
            t |= {p + "token_layernorm.weight": _norm(g, H),
                  p + "hidden_layernorm.weight": _norm(g, H),
                  p + "input_proj.weight": _rand(g, H, 2 * H),
                  p + "final_layernorm.weight": _norm(g, H)}
        t |= _block(g, cfg, p)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["DeepseekV3ForCausalLM" if style == "deepseek" else "MiMoForCausalLM"],
         "hidden_size": H, "vocab_size": V, "num_hidden_layers": L,
         "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
         "intermediate_size": cfg.intermediate_size, "num_nextn_predict_layers": n}
        | (config or {})))
    save_file(t, str(folder / "model.safetensors"))
    return t


# -- (a) loading and refusals ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_meta_layout_loads(tmp_path, fmt):
    write_meta(tmp_path / "m", _cfg(), n_future=4, fmt=fmt)
    heads = load_heads(tmp_path / "m", _cfg())
    assert isinstance(heads, ParallelMTPHeads) and heads.num_heads == 3 and heads.kv_layers == 3
    assert [b.self_attn.layer_idx for b in heads.blocks] == [LAYERS, LAYERS + 1, LAYERS + 2]


@pytest.mark.parametrize("style,n", [("deepseek", 1), ("deepseek", 2), ("mimo", 2)])
def test_sequential_layouts_load(tmp_path, style, n):
    t = write_sequential(tmp_path / "s", _cfg(), style, n, shared_head=True)
    heads = load_heads(tmp_path / "s", _cfg())
    assert isinstance(heads, SequentialMTPHeads) and heads.style == style
    assert heads.num_heads == n
    p = f"model.layers.{LAYERS}." if style == "deepseek" else "model.mtp_layers.0."
    name = "eh_proj.weight" if style == "deepseek" else "input_proj.weight"
    assert torch.equal(heads.mods[0].eh_proj.weight.double(), t[p + name])
    assert (heads.mods[0].head is not None) == (style == "deepseek")


def _edit_pth(path, fn):
    t = torch.load(path, weights_only=True)
    fn(t)
    torch.save(t, path)


@pytest.mark.parametrize("case,match", [
    ("hidden", "dim is 48, but the base model's hidden size is 32"),
    ("layers", "n_layers is 3"),
    ("missing", "missing tensor extra_heads.1.feed_forward.w2.weight"),
    ("shape", r"tensor extra_heads.0.attention.wk.weight has shape \[8, 32\]"),
    ("unexpected", "unexpected tensor extra_heads.3.ffn_norm.weight"),
    ("no-weights", "no consolidated"),
])
def test_meta_layout_refusals(tmp_path, case, match):
    folder = tmp_path / "m"
    write_meta(folder, _cfg(), n_future=3,
               params={"dim": 48} if case == "hidden" else {"n_layers": 3} if case == "layers"
               else None)
    f = folder / "consolidated.00.pth"
    if case == "missing":
        _edit_pth(f, lambda t: t.pop("extra_heads.1.feed_forward.w2.weight"))
    elif case == "shape":
        _edit_pth(f, lambda t: t.__setitem__("extra_heads.0.attention.wk.weight",
                                             torch.zeros(8, H)))
    elif case == "unexpected":
        _edit_pth(f, lambda t: t.__setitem__("extra_heads.3.ffn_norm.weight", torch.ones(H)))
    elif case == "no-weights":
        f.unlink()
    with pytest.raises(ValueError, match=match) as exc:
        load_heads(folder, _cfg())
    if case in ("missing", "shape", "unexpected"):
        assert str(f) in str(exc.value)
    if case in ("hidden", "layers"):
        assert str(folder / "params.json") in str(exc.value)


@pytest.mark.parametrize("case,match", [
    ("hidden", "hidden_size is 48, but the base model's hidden size is 32"),
    ("vocab", "vocab_size is 300"),
    ("missing", f"missing tensor model.layers.{LAYERS}.eh_proj.weight"),
    ("shape", rf"tensor model.layers.{LAYERS}.mlp.down_proj.weight has shape \[32, 7\]"),
    ("unexpected", f"unexpected tensor model.layers.{LAYERS + 1}.enorm.weight"),
    ("mimo-missing", "missing tensor model.mtp_layers.0.final_layernorm.weight"),
])
def test_sequential_layout_refusals(tmp_path, case, match):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "s"
    write_sequential(folder, _cfg(), "mimo" if case.startswith("mimo") else "deepseek",
                     config={"hidden_size": 48} if case == "hidden"
                     else {"vocab_size": 300} if case == "vocab" else None)
    f = folder / "model.safetensors"
    t = load_file(str(f))
    p = f"model.layers.{LAYERS}."
    if case == "missing":
        t.pop(p + "eh_proj.weight")
    elif case == "shape":
        t[p + "mlp.down_proj.weight"] = torch.zeros(H, 7)
    elif case == "unexpected":
        t[f"model.layers.{LAYERS + 1}.enorm.weight"] = torch.ones(H)
    elif case == "mimo-missing":
        t.pop("model.mtp_layers.0.final_layernorm.weight")
    save_file(t, str(f))
    with pytest.raises(ValueError, match=match) as exc:
        load_heads(folder, _cfg())
    assert str(f if case not in ("hidden", "vocab") else folder / "config.json") in str(exc.value)


# -- (b) invariant 2: greedy speculative == plain greedy -----------------------------------------
@pytest.mark.parametrize("tree", ["tree16", "tree8", "chain4"])
def test_meta_heads_never_change_greedy_output(tmp_path, model, plain_ref, tree):
    write_meta(tmp_path / "m", _cfg(), n_future=4, seed=7)
    eng = _engine(model, load_heads(tmp_path / "m", _cfg()), tree=tree)
    runs = run_requests(eng, [(p, greedy(MAX, ignore_eos=True)) for p in PROMPTS])
    assert [r.token_ids for r in runs] == plain_ref
    assert sum(r.last.spec.num_draft_tokens for r in runs) > 0


@pytest.mark.parametrize("style,n,tree", [("deepseek", 1, "chain4"), ("deepseek", 1, "tree16"),
                                          ("mimo", 2, "tree8")])
def test_sequential_heads_never_change_greedy_output(tmp_path, model, plain_ref, style, n, tree):
    write_sequential(tmp_path / "s", _cfg(), style, n, seed=8, shared_head=True)
    eng = _engine(model, load_heads(tmp_path / "s", _cfg()), tree=tree)
    runs = run_requests(eng, [(p, greedy(MAX, ignore_eos=True)) for p in PROMPTS])
    assert [r.token_ids for r in runs] == plain_ref
    assert sum(r.last.spec.num_draft_tokens for r in runs) > 0


# -- references ----------------------------------------------------------------------------------
def _rms(x, w, eps):
    """RMSNorm, normalising in float32 as model.RMSNorm does for every dtype but float32."""
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.inference_mode()
def trunk_states(model, ids):
    """One causal forward of `ids` from position 0 -> (final-normed hidden, residual
    entering the last layer), both [n, H]."""
    n = len(ids)
    kv = KVCache(model.config, 1, n, torch.float64, torch.device("cpu"))
    z = torch.zeros(n, dtype=torch.long)
    meta = AttentionMetadata(positions=torch.arange(n), token_slots=z, token_store=torch.arange(n),
                             seq_slots=z[:1], slot_start=0, kv_len=n, num_seqs=1, q_len=n,
                             q_gather=None, q_scatter=None,
                             mask=torch.ones(1, 1, n, n, dtype=torch.bool).tril_())
    return model(torch.tensor(ids), meta, kv, return_pre_last=True)


def _cos_sin(pos, cfg):
    """cos, sin [n, D/2] of the rotary angles, rounded to float32 as the engine's tables are."""
    D = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.outer(torch.tensor(list(pos), dtype=torch.float64), freqs)
    return ang.cos().float().double(), ang.sin().float().double()


def _attend(q, k, v, causal=True):
    """q: [n, Hq, D], k/v: [n, Hkv, D] -> [n, Hq*D], plain softmax attention."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[0]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(q.shape[0], -1)


def meta_block_reference(x, t, p, cfg):
    """Meta llama TransformerBlock over the full sequence x [n, H] (positions 0..n-1):
    Meta's weights and its complex rotary (interleaved pairs), causal attention."""
    n, D = x.shape[0], cfg.head_dim
    cos, sin = _cos_sin(range(n), cfg)
    rot = torch.complex(cos, sin)  # Meta's freqs_cis

    def rope(z):  # [n, heads, D]
        zc = torch.view_as_complex(z.reshape(*z.shape[:-1], D // 2, 2).contiguous())
        return torch.view_as_real(zc * rot[:, None, :]).flatten(2)

    xn = _rms(x, t[p + "attention_norm.weight"], cfg.rms_norm_eps)
    q = rope((xn @ t[p + "attention.wq.weight"].T).view(n, cfg.num_heads, D))
    k = rope((xn @ t[p + "attention.wk.weight"].T).view(n, cfg.num_kv_heads, D))
    v = (xn @ t[p + "attention.wv.weight"].T).view(n, cfg.num_kv_heads, D)
    h = x + _attend(q, k, v) @ t[p + "attention.wo.weight"].T
    hn = _rms(h, t[p + "ffn_norm.weight"], cfg.rms_norm_eps)
    ff = (F.silu(hn @ t[p + "feed_forward.w1.weight"].T) * (hn @ t[p + "feed_forward.w3.weight"].T))
    return h + ff @ t[p + "feed_forward.w2.weight"].T


def meta_reference_logits(model, t, committed):
    """The paper's algorithm: h_trunk = residual entering the last layer; head k = extra
    block k-1 over h_trunk, then the shared final norm and unembedding. -> [k, V] logits at
    the last position."""
    cfg = model.config
    _, h_trunk = trunk_states(model, committed)
    n_extra = len({k.split(".")[1] for k in t if k.startswith("extra_heads.")})
    out = []
    for i in range(n_extra):
        z = meta_block_reference(h_trunk, t, f"extra_heads.{i}.", cfg)[-1]
        out.append(_rms(z, model.norm.weight, cfg.rms_norm_eps) @ model.unembed_weight().T)
    return torch.stack(out)


# -- (c) the drafts themselves ---------------------------------------------------------------------
def test_meta_draft_logits_equal_the_papers_algorithm(tmp_path, model, plain_ref):
    """Through the engine: prefill, then verify steps of decoy-first trees whose accepted
    branch is not the first nodes (keep_path must move the extra blocks' K/V too). At every
    drafting point, the heads' logits equal the full-sequence reference over the committed
    tokens."""
    import random

    t = write_meta(tmp_path / "m", _cfg(), n_future=4, seed=11)
    heads = load_heads(tmp_path / "m", _cfg())
    eng = _engine(model, heads, tree="tree16")
    seen = []
    real = heads.candidates

    def spy(hidden, model_, last_tokens, num_heads=None, positions=None):
        seq = next(iter(eng._seqs.values()))
        seen.append((hidden.clone(), list(seq.token_ids), positions))
        return real(hidden, model_, last_tokens, num_heads, positions)

    heads.candidates = spy
    ref, rng = plain_ref[0], random.Random(2)
    eng.add_request("r", PROMPTS[0], greedy(MAX, ignore_eos=True))
    moved = 0
    try:
        eng.step()  # prefill
        seq = eng._seqs["r"]
        while len(seq.output_ids) + 4 <= MAX:
            n_out = len(seq.output_ids)
            truth = ref[n_out:n_out + rng.randrange(1, 4)]
            tree = DraftTree.root_only(seq.token_ids[-1])
            for d in range(len(truth)):  # decoys first at every depth
                tree.add_path(truth[:d] + [(truth[d] + 1 + rng.randrange(50)) % V])
            tree.add_path(truth)
            seq.draft = tree
            before = seq.num_cached
            out = [o for o in eng.step() if o.request_id == "r"][0]
            assert out.new_token_ids == ref[n_out:n_out + len(truth) + 1]
            moved += seq.num_cached - before > 1
    finally:
        eng.abort_request("r")
    assert len(seen) >= 4 and moved >= 2
    for feats, tokens, positions in seen:
        committed = tokens[:-1]  # the newest token is the bonus, not yet in the cache
        assert positions == [len(committed) - 1]
        want = meta_reference_logits(model, t, committed)  # [3, V]
        with torch.inference_mode():
            got64 = model.norm(feats[0]) @ model.unembed_weight().T  # [3, V], float64
            got = heads.head_logits(feats, model)[:, 0]  # what drafting ranks, float32
        torch.testing.assert_close(got64, want, rtol=0, atol=1e-9)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def hf_block_reference(x, pos, t, p, cfg):
    """HF-named decoder block over rows x [j, H] at rope positions `pos` (rotate-half),
    causal among themselves: the documented approximation's attention context."""
    n, D = x.shape[0], cfg.head_dim
    cos, sin = (c[:, None, :] for c in _cos_sin(pos, cfg))

    def rope(z):
        a, b = z.chunk(2, -1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    xn = _rms(x, t[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    q = rope((xn @ t[p + "self_attn.q_proj.weight"].T).view(n, cfg.num_heads, D))
    k = rope((xn @ t[p + "self_attn.k_proj.weight"].T).view(n, cfg.num_kv_heads, D))
    v = (xn @ t[p + "self_attn.v_proj.weight"].T).view(n, cfg.num_kv_heads, D)
    h = x + _attend(q, k, v) @ t[p + "self_attn.o_proj.weight"].T
    hn = _rms(h, t[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    ff = F.silu(hn @ t[p + "mlp.gate_proj.weight"].T) * (hn @ t[p + "mlp.up_proj.weight"].T)
    return h + ff @ t[p + "mlp.down_proj.weight"].T


def sequential_reference(model, t, style, n_mod, committed, bonus, depth=2, k=4,
                         context=False):
    """Chain of the modules from h_0 = final-normed trunk state at the last committed
    token, x_1 = the bonus token; each depth's top-k, continuing along the top-1. With
    `context` the first module also attends over its entries (h_i, x_{i+1}) at every
    earlier position i (or at the positions `context` lists)."""
    cfg, eps = model.config, model.config.rms_norm_eps
    hs, _ = trunk_states(model, committed)
    h, p0 = hs[-1], len(committed) - 1
    L, tok, tops = cfg.num_layers, bonus, []

    def names(m):
        if style == "deepseek":
            return f"model.layers.{L + m}.", "enorm", "hnorm", "eh_proj"
        return f"model.mtp_layers.{m}.", "token_layernorm", "hidden_layernorm", "input_proj"

    def block_input(m, tok, h, pos):
        p, en, hn, proj = names(m)
        emb = model.embed_tokens.weight[tok] * (pos != 0)
        e, hh = _rms(emb, t[p + en + ".weight"], eps), _rms(h, t[p + hn + ".weight"], eps)
        cat = torch.cat([e, hh] if style == "deepseek" else [hh, e])
        return cat @ t[p + proj + ".weight"].T, pos

    inputs: dict[int, list] = {}  # module -> its block inputs so far (its attention context)
    if context:
        where = range(p0) if context is True else sorted(context)
        inputs[0] = [block_input(0, committed[i + 1], hs[i], i) for i in where]
    for j in range(depth):
        m = min(j, n_mod - 1)
        p = names(m)[0]
        inputs.setdefault(m, []).append(block_input(m, tok, h, p0 + j))
        rows = torch.stack([r for r, _ in inputs[m]])
        x = hf_block_reference(rows, [q for _, q in inputs[m]], t, p, cfg)[-1]
        if style == "mimo":
            x = _rms(x, t[p + "final_layernorm.weight"], eps)
            logits = x @ model.unembed_weight().T
        else:
            normw = t.get(p + "shared_head.norm.weight", model.norm.weight)
            head = t.get(p + "shared_head.head.weight", model.unembed_weight())
            logits = _rms(x, normw, eps) @ head.T
        top = logits.topk(k).indices.tolist()
        tops.append(top)
        h, tok = x, top[0]
    return tops


@pytest.mark.parametrize("style,n_mod,shared_head", [("deepseek", 1, True), ("deepseek", 2, False),
                                                     ("mimo", 2, False), ("mimo", 1, False)])
def test_sequential_drafts_equal_the_reference(tmp_path, model, style, n_mod, shared_head):
    """Depth 1 and 2 (and 3, reusing the last module) for a batch mixing positions."""
    t = write_sequential(tmp_path / "s", _cfg(), style, n_mod, seed=5, shared_head=shared_head)
    heads = load_heads(tmp_path / "s", _cfg()).to(torch.float64).eval()
    seqs = [([11, 12, 13, 14, 15], 77), ([30], 31), ([5, 6, 7, 5, 6, 7, 5, 6, 7, 5], 200)]
    hidden = torch.stack([trunk_states(model, c)[0][-1] for c, _ in seqs])
    with torch.inference_mode():
        got = heads.candidates(hidden, model, [b for _, b in seqs], num_heads=3,
                               positions=[len(c) - 1 for c, _ in seqs])
    for (c, b), g in zip(seqs, got):
        assert g == sequential_reference(model, t, style, n_mod, c, b, depth=3)


@pytest.mark.parametrize("style,n_mod,chunk,slots", [("deepseek", 1, 512, 4), ("deepseek", 1, 3, 2),
                                                     ("mimo", 2, 4, 4)])
def test_engine_drafts_over_the_context_as_the_reference(tmp_path, model, plain_ref, style,
                                                         n_mod, chunk, slots, monkeypatch):
    """Checkpoint modules attend over every committed position (as vLLM runs them): at every
    step of a batch mixing lengths, with prompts prefilled whole or in chunks, each drafting
    sequence's candidates equal the reference computed from scratch over its tokens (its
    module entries were written from the right hidden rows, tokens and positions, and
    nothing of another sequence or a rejected draft is read)."""
    from mtpserve.decoding.engine import drafter as drafter_mod

    t = write_sequential(tmp_path / "s", _cfg(), style, n_mod, seed=9, shared_head=True)
    heads = load_heads(tmp_path / "s", _cfg()).to(torch.float64).eval()
    assert heads.context
    cfg = EngineConfig(dtype="float64", device="cpu", max_num_seqs=slots, max_model_len=128,
                       prefill_chunk_size=chunk,
                       spec=SpecConfig(mode="on", proposer="heads", tree="chain4"))
    eng = LLMEngine(cfg, model, ByteTok(), "tiny", heads=heads)
    seen = []
    real = drafter_mod.write_and_draft

    def spy(heads_, hidden, model_, entries, ctx, depth):
        out = real(heads_, hidden, model_, entries, ctx, depth)
        by_slot = {s.slot: s for s in eng._seqs.values()}
        for e, cands in zip([e for e in entries if e.drafts], out):
            seen.append((list(by_slot[e.slot].token_ids), depth, cands))
        return out

    monkeypatch.setattr(drafter_mod, "write_and_draft", spy)
    runs = run_requests(eng, [(p, greedy(MAX, ignore_eos=True)) for p in PROMPTS])
    assert [r.token_ids for r in runs] == plain_ref
    assert len(seen) > 3 * len(PROMPTS)
    for tokens, depth, cands in seen:
        want = sequential_reference(model, t, style, n_mod, tokens[:-1], tokens[-1], depth,
                                    context=True)
        assert cands == want


def test_context_skips_gaps_and_forgets_a_freed_slot(tmp_path, model):
    """Positions whose entries were never written (steps that drafted nothing) are masked,
    not read stale, and a reset slot keeps nothing of its previous sequence, although the
    cache buffer still holds that sequence's values at those positions."""
    from mtpserve.decoding.spec.mtp_context import ModuleContext, NewEntries, write_and_draft

    t = write_sequential(tmp_path / "s", _cfg(), "deepseek", 1, seed=10, shared_head=True)
    heads = load_heads(tmp_path / "s", _cfg()).to(torch.float64).eval()
    ids = [3, 17, 99, 4, 250, 8, 61, 61, 7, 120, 33, 5]
    other = [9, 200, 31, 77, 45, 46, 47, 48]
    hs, _ = trunk_states(model, ids)
    ho, _ = trunk_states(model, other)
    ctx = ModuleContext(_cfg(), 1, 2, 64, torch.float64, torch.device("cpu"))
    with torch.inference_mode():
        write_and_draft(heads, ho, model, [NewEntries(1, 0, list(range(7)), other[1:], True)],
                        ctx, 0)
        ctx.reset(1)
        write_and_draft(heads, hs, model, [NewEntries(1, 0, list(range(5)), ids[1:6], True)],
                        ctx, 0)
        got = write_and_draft(heads, hs, model,
                              [NewEntries(1, 7, [7, 8, 9, 10], ids[8:12], drafts=True)], ctx, 3)
    want = sequential_reference(model, t, "deepseek", 1, ids[:11], ids[11], 3,
                                context={0, 1, 2, 3, 4, 7, 8, 9})
    assert got == [want]
    full = sequential_reference(model, t, "deepseek", 1, ids[:11], ids[11], 3, context=True)
    assert want != full  # the gap matters, so the check above could fail


def test_engine_feeds_chain_mode_heads_the_trunk_state_and_position(tmp_path, model):
    write_sequential(tmp_path / "s", _cfg(), "deepseek", 1, seed=6)
    heads = load_heads(tmp_path / "s", _cfg())
    heads.context = False  # heads trained on the chain alone draft through candidates()
    eng = _engine(model, heads, tree="chain4")
    seen = []
    real = heads.candidates

    def spy(hidden, model_, last_tokens, num_heads=None, positions=None):
        seq = next(iter(eng._seqs.values()))
        seen.append((hidden.clone(), list(seq.token_ids), list(last_tokens), positions))
        return real(hidden, model_, last_tokens, num_heads, positions)

    heads.candidates = spy
    run_requests(eng, [(PROMPTS[0], greedy(8, ignore_eos=True))])
    assert len(seen) >= 2
    for hidden, tokens, last, positions in seen:
        committed = tokens[:-1]
        assert last == [tokens[-1]] and positions == [len(committed) - 1]
        h, _ = trunk_states(model, committed)
        torch.testing.assert_close(hidden[0], h[-1], rtol=0, atol=1e-9)


# -- --heads DIR end to end ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["meta", "deepseek", "mimo"])
def test_heads_flag_loads_each_layout_for_a_checkpoint_folder(tmp_path, layout):
    """EngineConfig(model=HF folder, spec.heads_path=MTP folder), as `--heads DIR` builds it:
    the layout is detected, and greedy output equals plain decoding's."""
    from test_checkpoint_errors import make_folder

    from mtpserve.decoding.model.checkpoint import load_checkpoint

    base = make_folder(tmp_path)
    cfg = load_checkpoint(str(base)).config
    heads_dir = tmp_path / "heads"
    if layout == "meta":
        write_meta(heads_dir, cfg, n_future=3)
    else:
        write_sequential(heads_dir, cfg, layout, n=2)
    eng = LLMEngine.from_config(EngineConfig(
        model=str(base), dtype="float64", device="cpu", max_num_seqs=2, max_model_len=64,
        spec=SpecConfig(mode="on", proposer="heads", heads_path=str(heads_dir))))
    assert type(eng.heads) is (ParallelMTPHeads if layout == "meta" else SequentialMTPHeads)
    prompts = [[3, 4, 5, 6], [7]]
    spec = run_requests(eng, [(p, greedy(12, ignore_eos=True)) for p in prompts])
    plain = run_requests(eng, [(p, greedy(12, ignore_eos=True, speculate=False)) for p in prompts])
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert all(r.last.spec.num_draft_tokens > 0 for r in spec)


def test_one_folder_serves_as_model_and_as_heads(tmp_path):
    """A checkpoint whose safetensors carry its own MTP modules (config.json with
    num_nextn_predict_layers): the trunk loader leaves them to the heads loader."""
    from safetensors.torch import load_file, save_file
    from test_checkpoint_errors import _config, make_folder

    from mtpserve.decoding.model.checkpoint import hf_config

    folder = make_folder(tmp_path, config=_config() | {"num_nextn_predict_layers": 1})
    cfg = hf_config(json.loads((folder / "config.json").read_text()), folder)
    mtp = write_sequential(tmp_path / "mtp", cfg, "deepseek", n=1)
    f = folder / "model.safetensors"
    save_file(load_file(str(f)) | {k: v.float() for k, v in mtp.items()
                                   if k.startswith(f"model.layers.{cfg.num_layers}.")}, str(f))
    eng = LLMEngine.from_config(EngineConfig(
        model=str(folder), dtype="float64", device="cpu", max_num_seqs=1, max_model_len=64,
        spec=SpecConfig(mode="on", proposer="heads", heads_path=str(folder))))
    assert isinstance(eng.heads, SequentialMTPHeads)
    spec, = run_requests(eng, [([3, 4, 5], greedy(10, ignore_eos=True))])
    plain, = run_requests(eng, [([3, 4, 5], greedy(10, ignore_eos=True, speculate=False))])
    assert spec.token_ids == plain.token_ids and spec.last.spec.num_draft_tokens > 0


def test_draft_timer_writes_and_drafts_as_a_decode_step(tmp_path, model):
    """bench --calibrate-tree times context modules with this: a prefilled context, then
    each call writes the step's accepted rows and drafts the chain."""
    from mtpserve.decoding.spec.mtp_context import ModuleContext, draft_timer

    write_sequential(tmp_path / "s", _cfg(), "deepseek", 1, seed=11, shared_head=True)
    heads = load_heads(tmp_path / "s", _cfg()).to(torch.float64).eval()
    ctx = ModuleContext(_cfg(), 1, 2, 64, torch.float64, torch.device("cpu"))
    run = draft_timer(heads, model, ctx, context=10, new_rows=2)
    assert ctx.valid[0].sum() == 10
    with torch.inference_mode():
        (chain,) = run(3)
    assert len(chain) == 3 and all(len(d) == heads.topk for d in chain)
    assert ctx.valid[0, :12].all() and ctx.valid[0].sum() == 12  # chain steps stay invalid
    ctx.reset(0)
    assert not ctx.valid.any()
