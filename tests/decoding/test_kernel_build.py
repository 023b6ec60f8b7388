"""Kernel builds (model/kernel_build.py): which kernels an engine's settings load, and the
first start's side-by-side build of the ones not built yet."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mtpserve.decoding.model import kernel_build as kb

TINY = """
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor twice(const at::Tensor& x) { return x * 2; }
TORCH_LIBRARY(mtpserve_prebuild_test, m) { m.def("twice(Tensor x) -> Tensor", &twice); }
"""


@pytest.mark.parametrize("settings,want", [
    (("int4", "auto", "auto", "auto"), ["row_attention", "int4_vnni", "q8_unembed"]),
    (("int4", "aten", "fp32", "sdpa"), []),
    (("int8", "auto", "q8", "rows"), ["row_attention", "q8_unembed"]),
    (("dense", "auto", "auto", "auto"), ["row_attention"]),
])
def test_the_kernels_an_engine_loads(settings, want, monkeypatch):
    monkeypatch.setattr(kb.platform, "machine", lambda: "x86_64")
    assert [p.stem for p in kb.cpu_kernels(*settings)] == want
    assert all(p.is_file() for p in kb.cpu_kernels(*settings))
    monkeypatch.setattr(kb.platform, "machine", lambda: "aarch64")
    assert kb.cpu_kernels(*settings) == []


def _path_without(tmp_path: Path, *names: str) -> str:
    """A PATH of one folder linking every program of the system's PATH but `names`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder) or Path(folder) == Path(sys.executable).parent:
            continue  # the venv's own bin folder holds the pip ninja
        for entry in os.scandir(folder):
            if entry.name not in names and not (bin_dir / entry.name).exists():
                (bin_dir / entry.name).symlink_to(entry.path)
    return str(bin_dir)


def test_a_missing_kernel_is_built_in_a_child_and_a_built_one_is_left(tmp_path, monkeypatch):
    # no ninja on PATH, as on a machine without a system ninja running the venv's scripts
    # unactivated: the pip ninja (a dependency) must be found all the same
    monkeypatch.setenv("PATH", _path_without(tmp_path, "ninja"))
    assert shutil.which("ninja") is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    folder, name = kb._build_dir(src)
    kb.prebuild([src])()  # the child builds it into this cache
    assert (folder / f"{name}.so").is_file()
    started = []
    monkeypatch.setattr(kb.subprocess, "Popen", lambda *a, **k: started.append(a) or
                        subprocess.Popen(["true"]))
    kb.prebuild([src])()
    assert started == []  # built already: no child
    monkeypatch.undo()  # Popen back, and the PATH with ninja

    # build_all (`mtpserve build-kernels`): the built one stays built, a broken one says why
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    broken = tmp_path / "broken.cpp"
    broken.write_text(TINY.replace("x * 2;", "x * undeclared_name;"))
    results = kb.build_all([src, broken])
    assert results["tiny"] is None
    assert results["broken"] and "broken" in results["broken"], results


def test_build_kernels_command_builds_every_kernel_of_this_cpu(capsys):
    from mtpserve.server.cli import main

    assert main(["build-kernels"]) == 0  # built already by the engine tests: loads only
    out = capsys.readouterr().out
    for source in kb.cpu_kernels("int4", "auto", "auto", "auto"):
        assert f"  {source.stem}: ready" in out
        assert kb._built(source)


def test_without_a_compiler_a_kernel_falls_back_with_a_warning_naming_it(tmp_path, monkeypatch,
                                                                         caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing at all on PATH
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    with caplog.at_level(logging.WARNING):
        assert kb.build_extension(src, "the tiny kernel", "nothing") is False
    assert "the tiny kernel did not build or load (no C++ compiler (c++) on PATH" in caplog.text
    assert "apt-get install g++" in caplog.text and "using nothing" in caplog.text
