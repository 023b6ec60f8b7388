"""`mtpserve bench`: offline benchmark of the engine, printed as tables and written as JSON.

Every number that is compared with another comes from the same process, the same prompts
and the same machine (docs/benchmarks.md). Sections, chosen by flags (default: plain):

- plain (default, or --plain): plain-decoding tokens/s (prefill included) and ms per decode
  step at batch 1 and each --batch-sizes, for this engine and for `transformers` `generate`
  on the same weights, dtype and token ids; peak RSS; the weight-streaming limit (model bytes
  / measured memory bandwidth) and the fraction of it that batch-1 decode reaches.
- --verify-curve: cost of one forward over k new tokens at a fixed context, as ms and as a
  ratio to k = 1; this is what a speculative step pays for drafting k - 1 tokens.
- --compare: speculation off vs on for the same prompts on ONE engine, per-request switch,
  on/off interleaved per prompt group: greedy, typical (T=0.7) and rejection (T=0.7).
- --profile: torch.profiler table of one decode step (plain, and speculative when enabled).
- --calibrate-tree: the draft tree with the best expected speedup for these heads here.

Prompts: the first --num-prompts HumanEval problems (a fixed subset: HumanEval/0 .. N-1), each
as the chat message "Complete this Python function: ...", or a JSONL file (--prompts) with
`messages` (chat) or `prompt` (plain text, encoded as is) per line. Output lengths are fixed
(ignore_eos) unless --eos. No timing is asserted anywhere: this is a script, not a test.

Modules, one per part; each imports only the ones above it in this list:

- tables: fixed-width text tables.
- prompts: HumanEval / JSONL prompts and their token ids.
- runs: the timed engine loop every section uses (BatchRun, run_engine_batch).
- memory: memory bandwidth, bytes a decode step streams, RSS.
- transformers_baseline: the same prompts through transformers' `generate`.
- plain: the plain section (engine vs transformers, weight-streaming limit).
- verify_curve: the --verify-curve section.
- compare: the --compare section (speculation off vs on).
- profiling: the --profile section.
- tree_calibration: the --calibrate-tree section.
- cli: the flags and `run_bench`, the command's entry point.

This file imports none of them, so importing one never pulls in the others.
"""
