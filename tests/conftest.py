"""Session-wide fixtures shared by the test packages."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_engine():
    """ONE engine for the whole session: the embedded default model, dense fp32 (the
    transformers oracle's precision; `weights=auto` would serve it as int4).

    Tests must not step it while a server's runner owns it: server tests reach it only
    through the runner of tests/server/conftest.py.
    """
    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine

    # Speculation "on" (not auto) so every request drafts and the invariants are exercised;
    # the heads' own tree ("default"), not one timed on this machine (--tree auto): the
    # shared engine behaves the same on every machine.
    return LLMEngine.from_config(EngineConfig(dtype="float32", weights="dense", max_num_seqs=8,
                                              max_model_len=1024,
                                              spec=SpecConfig(mode="on", tree="default")))
