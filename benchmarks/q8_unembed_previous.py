"""The previous Q8_0 unembedding kernel (fp32 activations, fp32 FMA; commit 5a18ef6), built
from git under its own op namespace (mtpserve_q8_prev) so that a benchmark can time it beside
today's int16-activation kernel in one process. Needs the repository's git history.

    from q8_unembed_previous import load_previous
    prev = load_previous()          # None (with the reason printed) where it cannot build
    packed = prev.pack(q, d); y = prev.mm(x, packed, n)
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import torch

from mtpserve.decoding.model.kernel_build import kernel_cache_dir

COMMIT = "5a18ef6"  # the last commit with the fp32-activation kernel
SOURCE = "decoding/model/kernels/q8_unembed.cpp"
ROOT = Path(__file__).resolve().parent.parent


class Previous:
    """pack(q, d) -> its layout ([N/16, K/32, 544]: byte 16k + j = row j's q at K offset k,
    then 16 fp16 d); mm(x, packed, n) -> fp32 logits."""

    @staticmethod
    def pack(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        n, k = q.shape
        nb, g = n // 16, k // 32
        qb = q.view(torch.uint8).reshape(nb, 16, g, 32).permute(0, 2, 3, 1).reshape(nb, g, 512)
        db = d.reshape(nb, 16, g).permute(0, 2, 1).contiguous().view(torch.uint8)
        flat = torch.cat([qb, db], dim=-1).reshape(-1)
        out = torch.empty(flat.numel() + 64, dtype=torch.uint8)
        off = (-out.data_ptr()) % 64
        out = out[off:off + flat.numel()].view(nb, g, 544)
        out.copy_(flat.view(nb, g, 544))
        return out

    @staticmethod
    def mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
        return torch.ops.mtpserve_q8_prev.mm(x.float().contiguous(), packed, n)


def load_previous() -> Previous | None:
    from torch.utils.cpp_extension import load
    try:
        src = subprocess.run(["git", "show", f"{COMMIT}:{SOURCE}"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"previous q8 kernel: no source from git ({exc}); not timed")
        return None
    src = src.replace("TORCH_LIBRARY(mtpserve_q8,", "TORCH_LIBRARY(mtpserve_q8_prev,")
    src = src.replace("TORCH_LIBRARY_IMPL(mtpserve_q8,", "TORCH_LIBRARY_IMPL(mtpserve_q8_prev,")
    tag = hashlib.sha256(src.encode() + torch.__version__.encode()).hexdigest()[:12]
    build = kernel_cache_dir() / f"q8_unembed_prev-{tag}"
    build.mkdir(parents=True, exist_ok=True)
    path = build / "q8_unembed_prev.cpp"
    path.write_text(src)
    load(name=f"mtpserve_q8_unembed_prev_{tag}", sources=[str(path)], build_directory=str(build),
         extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)
    return Previous()
