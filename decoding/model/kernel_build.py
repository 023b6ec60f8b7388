"""Our C++ kernels (kernels/*.cpp) built at first use, and the user's cache folder they and
inductor's compiled graphs live in.

torch.utils.cpp_extension compiles a source into `kernel_cache_dir()` once per source text
and torch version; later processes only load it. Callers decide what falls back:
`load_kernel` raises, `build_extension` warns once and returns False.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def user_cache_dir() -> Path:
    """($XDG_CACHE_HOME or ~/.cache)/mtpserve: what outlives /tmp being cleared."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtpserve"


def kernel_cache_dir() -> Path:
    return user_cache_dir() / "kernels"


KERNELS = Path(__file__).with_name("kernels")


def files_digest(files: Iterable[Path], seed: str = "", root: Path | None = None,
                 length: int = 16) -> str:
    """A digest of `files`' names (relative to `root`, else bare) and bytes in the order
    given, after `seed`: what the caches keyed by our code (kernel timings, prepared
    models, saved graphs) compare."""
    h = hashlib.sha256(seed.encode())
    for f in files:
        name = str(f.relative_to(root)) if root is not None else f.name
        h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:length]


def kernels_digest() -> str:
    """A digest of our kernels' sources (kernels/*.cpp): what a cached measurement of their
    speed (the `--tree auto` choice) depends on beside the machine, so an upgraded kernel
    is measured again."""
    return files_digest(sorted(KERNELS.glob("*.cpp")), length=12)


def aligned64(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when contiguous with 64-byte aligned data (what our kernels' packed
    weights require, and torch's CPU allocator gives), else an aligned copy: a tensor read
    back from a file (prepared_cache.py) sits wherever the file put it."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    buf = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8)
    off = (-buf.data_ptr()) % 64
    out = buf[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def _build_dir(source: Path) -> tuple[Path, str]:
    """The folder `source` builds into and the extension's name: per source text and torch."""
    tag = hashlib.sha256(source.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return kernel_cache_dir() / f"{source.stem}-{tag}", f"mtpserve_{source.stem}_{tag}"


def missing_build_tool(compiler: bool = True) -> str | None:
    """What stops torch's JIT build of our kernels here (ninja, and a C++ compiler when
    `compiler`: loading one built before needs ninja alone), said so a user can fix it, or
    None. The `ninja` wheel (a dependency) puts its binary in the venv's bin folder, which
    is not on PATH when the venv's scripts run without activating it: that folder is put
    on PATH here."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI wheel; torch's JIT build runs `ninja` from PATH
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if shutil.which("ninja") is None:
        return "ninja was not found (pip install ninja)"
    return missing_compiler("c++") if compiler else None  # c++: what torch's build runs


def missing_compiler(default: str) -> str | None:
    """None when $CXX (else `default`: torch's JIT build runs c++, inductor g++) is on
    PATH, else what to install."""
    cxx = os.environ.get("CXX") or default
    if shutil.which(cxx) is None:
        return (f"no C++ compiler ({cxx}) on PATH: install one (Debian/Ubuntu: "
                "apt-get install g++)")
    return None


def load_kernel(source: Path) -> None:
    """JIT-build (first process) or load (later) the C++ extension `source` (one of
    kernels/*.cpp, registering its own torch ops) into kernel_cache_dir(), one folder per
    source and torch version. Raises on any failure."""
    from torch.utils.cpp_extension import load
    build, name = _build_dir(source)
    missing = missing_build_tool(compiler=not (build / f"{name}.so").is_file())
    if missing is not None:
        raise RuntimeError(missing)
    build.mkdir(parents=True, exist_ok=True)
    # no -march: the AVX-512 code carries its own target attributes, the rest stays
    # generic x86-64; never -ffast-math (the float order is what makes rows invariant).
    # -fopenmp: at::parallel_for is inline OpenMP, serial without it (torch's libgomp
    # is the one loaded, same soname)
    load(name=name, sources=[str(source)], build_directory=str(build),
         extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)


def cpu_kernels(weights: str, int4_kernel: str, unembed: str, attention_kernel: str
                ) -> list[Path]:
    """The kernel sources a CPU engine of these settings loads (x86-64 only: elsewhere none
    runs)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    names = ["row_attention"] if attention_kernel in ("auto", "rows") else []
    if weights == "int4" and int4_kernel != "aten":
        names.append("int4_vnni")
    if weights in ("int8", "int4") and unembed in ("auto", "q8"):
        names.append("q8_unembed")
    return [KERNELS / f"{n}.cpp" for n in names]


def prebuild(sources: list[Path]) -> Callable[[], None]:
    """Start building the kernel `sources` this machine has not built yet, side by side,
    each in a child process; returns a wait(). A first start builds three, ~40 s one after
    another on 2 cores, ~20-30 s side by side. The process's own load_kernel later finds
    them built (or waits on the build's lock, or reports a failure itself: a child's
    failure is not reported here)."""
    procs = [_build_in_child(s, subprocess.DEVNULL) for s in sources if not _built(s)]
    if procs:
        log.info("building %d C++ kernel(s) for this machine (once; cached under %s)",
                 len(procs), kernel_cache_dir())

    def wait() -> None:
        for p in procs:
            try:
                p.wait(timeout=900)
            except subprocess.TimeoutExpired:
                p.kill()
    return wait


def _built(source: Path) -> bool:
    folder, ext = _build_dir(source)
    return (folder / f"{ext}.so").is_file()


def _build_in_child(source: Path, stderr: int) -> subprocess.Popen:
    code = ("import sys, pathlib; from mtpserve.decoding.model.kernel_build import "
            "child_build; sys.exit(child_build(pathlib.Path(sys.argv[1])))")
    return subprocess.Popen([sys.executable, "-c", code, str(source)],
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def child_build(source: Path) -> int:
    """A build child's body: load_kernel, or 1 with why (`build_failure`) on stderr's last
    line."""
    try:
        load_kernel(source)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, whatever it is
        print(build_failure(exc), file=sys.stderr)
        return 1
    return 0


def build_failure(exc: Exception) -> str:
    """One line for a failed build or load: the exception's first line, and the compiler's
    first error where there is one."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    head = lines[0].split(": [")[0]  # torch's "Error building extension 'x': [1/2] c++ ..."
    first_error = next((ln.strip() for ln in lines if "error:" in ln), "")
    return head + (f" ({first_error})" if first_error else "")


def build_all(sources: list[Path]) -> dict[str, str | None]:
    """Build `sources` now, side by side, as a first start would (`mtpserve build-kernels`,
    which scripts/install.sh runs): {name: None where built (or built before), else why
    not (the build's last error line)}."""
    missing = missing_build_tool()
    if missing is not None:
        return {s.stem: missing for s in sources}
    procs = {s.stem: _build_in_child(s, subprocess.PIPE) for s in sources if not _built(s)}
    results: dict[str, str | None] = {s.stem: None for s in sources}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results[name] = "timed out after 900 s"
            continue
        if proc.returncode != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            results[name] = lines[-1] if lines else f"exit status {proc.returncode}"
    return results


def build_extension(source: Path, what: str, fallback: str) -> bool:
    """load_kernel(source), or False with one warning naming `what` and `fallback`."""
    try:
        load_kernel(source)
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: no kernel
        log.warning("%s did not build or load (%s); using %s", what, build_failure(exc),
                    fallback)
        return False
    return True


class BuiltOnce:
    """A kernel module's `available()`: `build` (build_extension plus the module's own CPU
    checks) runs once per process, under a lock; its answer is kept in `loaded`
    (None: not tried yet)."""

    def __init__(self, build: Callable[[], bool]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self.loaded: bool | None = None

    def available(self) -> bool:
        """Whether the kernel runs here; builds (first process) or loads (later) it once."""
        with self._lock:
            if self.loaded is None:
                self.loaded = self._build()
            return self.loaded
