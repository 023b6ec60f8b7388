"""What one `mtpserve train-heads` run is told: the training settings (`TrainConfig`,
shared by the Medusa, sequential and joint modes), the command-line flags that fill them,
and the command line as recorded in heads.json.

Why a module of its own: every mode and the dispatcher read these, and the CLI
registration (tools/commands.py) needs the flags without importing any training code.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass

from ..config import WEIGHT_FORMATS


@dataclass(slots=True)
class TrainConfig:
    """Settings of one training run, recorded in heads.json and in checkpoints (a resume
    with other settings is refused)."""

    head_type: str = "medusa"  # medusa | sequential (train_sequential.py)
    num_heads: int = 4  # medusa: heads; sequential: chain depths trained
    num_layers: int = 1
    epochs: int = 6
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_tokens: int = 1024  # positions per optimizer step
    seed: int = 0
    checkpoint_every: int = 50  # steps; 0: only at the end
    holdout_frac: float = 0.05
    targets: str = "argmax"  # argmax: base's greedy choice at t+k; tokens: x_{t+1+k}
    vocab: str = "plausible"  # softmax over: targets + base top-k (plausible) | targets | full
    plausible_topk: int = 8
    warmup_steps: int = 20
    attention: str = "chain"  # sequential: chain (draft chain only) | context (mtp_context.py)
    distill: str = "top1"  # sequential: top1 (cross-entropy to the target) | kl (to the trunk's softmax)
    chain_inputs: str = "targets"  # sequential: tokens fed at depths: as --targets | data (the data's)
    chain_features: str = "own"  # sequential chain: own (depth j reads depth j-1's state) | trunk

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError("need num_heads >= 1 and num_layers >= 1")
        if self.epochs < 1 or self.batch_tokens < 1 or self.lr <= 0:
            raise ValueError("need epochs >= 1, batch_tokens >= 1, lr > 0")
        if not 0.0 <= self.holdout_frac < 1.0:
            raise ValueError("holdout_frac must be in [0, 1)")
        if self.head_type not in ("medusa", "sequential"):
            raise ValueError("head_type must be medusa or sequential")
        if self.attention not in ("context", "chain"):
            raise ValueError("attention must be context or chain")
        if self.distill not in ("top1", "kl") or self.chain_inputs not in ("targets", "data") \
                or self.chain_features not in ("own", "trunk"):
            raise ValueError("distill must be top1|kl, chain_inputs targets|data, "
                             "chain_features own|trunk")
        if self.head_type != "sequential" and (self.distill, self.chain_inputs,
                                               self.chain_features) != ("top1", "targets", "own"):
            raise ValueError("--distill, --chain-inputs and --chain-features are for "
                             "--head-type sequential")
        if self.attention == "context" and self.chain_features != "own":
            raise ValueError("--chain-features trunk needs --module-attention chain")
        if self.targets not in ("argmax", "tokens") or \
                self.vocab not in ("plausible", "targets", "full"):
            raise ValueError("targets must be argmax|tokens, vocab plausible|targets|full")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The `mtpserve train-heads` flags (all three modes and --draft-vocab-only)."""
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded model)")
    p.add_argument("--data", nargs="+", required=True,
                   help=".py/.txt/.md files or folders; JSONL of {text}, {prompt} / {messages} "
                        "(answered by the model) or {prompt_ids, completion_ids}")
    p.add_argument("--out", required=True, help="output folder: heads.json, heads.safetensors, "
                                                "checkpoints, caches")
    p.add_argument("--head-type", default="medusa", choices=["medusa", "sequential"],
                   help="medusa: one residual block per future token, all from h_t; "
                        "sequential: one DeepSeek/EAGLE-style module that also reads the "
                        "token it just drafted, run once per depth (train_sequential.py)")
    p.add_argument("--module-attention", default="chain", choices=["chain", "context"],
                   help="sequential: what the module attends over: the draft chain only "
                        "(chain), or also its own entries at every earlier position (context, "
                        "as EAGLE/DeepSeek; on the embedded model's ~170k training tokens it "
                        "generalised worse, docs/experiments.md)")
    p.add_argument("--distill", default="top1", choices=["top1", "kl"],
                   help="sequential: the loss of each depth: cross-entropy to the target token "
                        "(top1), or KL to the frozen trunk's softmax at that position over the "
                        "training softmax vocabulary (kl; soft targets, as HASS/EAGLE distil)")
    p.add_argument("--chain-inputs", default="targets", choices=["targets", "data"],
                   help="sequential: the tokens the chain reads at each depth: those --targets "
                        "names (targets; with argmax, the base's greedy tokens), or the data's "
                        "own tokens (data: right for sampled answers, where the base's greedy "
                        "token is not the one its later choices followed)")
    p.add_argument("--chain-features", default="own", choices=["own", "trunk"],
                   help="sequential, chain attention: what depth j >= 2 reads as its hidden "
                        "input: the module's own state from depth j-1, as drafting runs it "
                        "(own: training-time test), or the trunk's h_{t+j-1} (trunk: EAGLE-1-"
                        "style teacher-forced features, an ablation)")
    p.add_argument("--num-heads", type=int, default=4,
                   help="medusa: heads; sequential: chain depths trained")
    p.add_argument("--num-layers", type=int, default=1, help="residual blocks per head (medusa)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-tokens", type=int, default=1024, help="positions per optimizer step")
    p.add_argument("--seq-len", type=int, default=1024, help="trunk window for long texts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--holdout-frac", type=float, default=0.05, help="sequences held out for the report")
    p.add_argument("--generate-max-tokens", type=int, default=256, help="answer length for prompts")
    p.add_argument("--generated", default=None,
                   help="JSONL cache of the model's answers (default OUT/answers.jsonl)")
    p.add_argument("--gen-batch", type=int, default=16, help="max_num_seqs while answering")
    p.add_argument("--gen-weights", default="dense", choices=WEIGHT_FORMATS,
                   help="the trunk's weights while answering: dense (--dtype, the same trunk "
                        "as the hidden-state pass) or the served format (auto: what `serve` "
                        "picks; on CPU int4 with our kernels, several times faster at batch 32)")
    p.add_argument("--trunk-weights", default="dense", choices=WEIGHT_FORMATS,
                   help="the trunk's weights in the hidden-state pass the heads train on: "
                        "dense (--dtype) or the served format (auto: what `serve` picks): "
                        "then the heads learn the served trunk's features and greedy choices, "
                        "what drafting reads and verification accepts (and on CPU the pass "
                        "runs ~1.5x faster than fp32)")
    g = p.add_argument_group("answer generation (answer_gen.py)")
    g.add_argument("--gen-chunk", type=int, default=None, metavar="N",
                   help="requests kept queued in the engine while answering (a finished one "
                        "is replaced at once; default 4 x --gen-batch)")
    g.add_argument("--gen-greedy", action=argparse.BooleanOptionalAction, default=True,
                   help="generate each prompt's greedy answer (default on)")
    g.add_argument("--gen-samples", type=int, default=0, metavar="N",
                   help="also N sampled answers per prompt at --gen-temperature, each seeded "
                        "from (--gen-seed, prompt, sample index) so a resume asks for the "
                        "same sample; cached beside the greedy ones (default 0)")
    g.add_argument("--gen-temperature", type=float, default=0.7, help="sampled answers' temperature")
    g.add_argument("--gen-seed", type=int, default=0, help="seed of the sampled answers")
    g.add_argument("--generate-only", action="store_true",
                   help="stop after the answers are generated and cached (no training)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="trunk dtype for answering and the hidden-state pass (heads train in fp32)")
    p.add_argument("--targets", default="argmax", choices=["argmax", "tokens"],
                   help="argmax: the base model's greedy choice (self-distillation); tokens: the data")
    p.add_argument("--vocab", default="plausible", choices=["plausible", "targets", "full"],
                   help="training softmax over the targets plus the base model's top-8 at every "
                        "position (default), the targets only, or the full vocabulary (slow); "
                        "held-out accuracy is always over the full vocabulary")
    p.add_argument("--draft-vocab", type=int, default=8192, metavar="N",
                   help="draft vocabulary: heads draft only from the N most frequent answer "
                        "tokens of the training split plus every head target seen in training "
                        "(stored in heads.safetensors; 0: the full vocabulary)")
    p.add_argument("--draft-vocab-only", action="store_true",
                   help="do not train: add (or replace) the draft vocabulary of the heads "
                        "already in OUT, built from the same --data/--generated (nothing is "
                        "generated) and the split in OUT/heads.json; prints held-out accuracy "
                        "over the full and the draft vocabulary")
    p.add_argument("--init-heads", default=None, metavar="DIR",
                   help="sequential: start from these heads' module weights (e.g. train "
                        "--module-attention chain first, then context from its output)")
    p.add_argument("--hidden-cache", default=None,
                   help="trunk hidden-state cache, reused while the data is the same "
                        "(default OUT/hidden_cache.pt)")
    j = p.add_argument_group("joint fine-tuning (train_joint.py)")
    j.add_argument("--joint", action="store_true",
                   help="train the trunk together with Medusa heads (no hidden cache: trunk "
                        "forward+backward every step; targets are the data's tokens); writes "
                        "the fine-tuned model to OUT/model, which the heads then belong to")
    j.add_argument("--curriculum", default="forward", choices=["forward", "none"],
                   help="--joint: forward: next-token loss first, heads switched on one after "
                        "another over the ramp; none: every head from step 0")
    j.add_argument("--curriculum-ramp", type=float, default=0.5, metavar="FRAC",
                   help="--joint: share of the steps over which the heads switch on")
    j.add_argument("--trunk-lr", type=float, default=1e-5,
                   help="--joint: trunk learning rate (the heads keep --lr)")
    j.add_argument("--trunk-layers", type=int, default=None, metavar="N",
                   help="--joint: train the last N decoder layers and the final norm "
                        "(default: all); embedding and unembedding stay frozen")
    j.add_argument("--max-steps", type=int, default=0, metavar="N",
                   help="--joint: stop after N steps, the lr schedule and curriculum laid out "
                        "for N (0: all epochs)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def generation_options(a: argparse.Namespace) -> dict:
    """The answer_gen.generate_answers options the flags ask for (greedy / sampled)."""
    return {"greedy": a.gen_greedy, "samples": a.gen_samples, "temperature": a.gen_temperature,
            "seed": a.gen_seed}


def command_line() -> str:
    """This process's command line, as `mtpserve train-heads ...` when run from the CLI."""
    if len(sys.argv) > 1 and sys.argv[1] == "train-heads":
        return "mtpserve train-heads " + " ".join(shlex.quote(x) for x in sys.argv[2:])
    return " ".join(map(shlex.quote, sys.argv))
