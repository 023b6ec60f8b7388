"""One of our C++ kernels as it was at another git revision, built beside today's under an
op namespace of its own: what the kernel A/B scripts (int4_kernel_ab.py, q8_kernel_ab.py)
time today's kernel against, in one process.

    from kernel_revision import build_at_revision
    ops = build_at_revision("HEAD~1", "decoding/model/kernels/q8_unembed.cpp", "mtpserve_q8")
    ops.mm(x, packed, n)   # torch.ops.mtpserve_q8_base.mm
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import torch
from mtpserve.decoding.model.kernel_build import load_kernel

ROOT = Path(__file__).resolve().parent.parent


def build_at_revision(rev: str, source: str, namespace: str) -> object:
    """Build `source` (a path in the repository) as of `rev` with its op namespace
    `namespace` renamed to `namespace`_base; returns torch.ops.<namespace>_base."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{source}"], check=True,
                          capture_output=True, text=True).stdout
    base = f"{namespace}_base"
    src = Path(tempfile.mkdtemp()) / f"{Path(source).stem}_base.cpp"
    src.write_text(text.replace(namespace, base))
    load_kernel(src)
    return getattr(torch.ops, base)
