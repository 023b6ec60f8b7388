"""Workload loading."""
import json

import pytest

from mtpserve.loadtest.workloads import HUMANEVAL_CHAT_TEMPLATE, load_workload


def test_humaneval_has_164_prompts():
    prompts = load_workload("humaneval")
    assert len(prompts) == 164
    assert len({p.id for p in prompts}) == 164
    p = next(p for p in prompts if p.id == "HumanEval/0")
    assert p.completion_prompt().startswith("from typing import List")
    msg = p.chat_messages()
    assert msg == [{"role": "user", "content": HUMANEVAL_CHAT_TEMPLATE.format(prompt=p.prompt)}]
    assert msg[0]["content"].startswith("Complete this Python function:\n```python\n")


def test_seed_fixes_order_and_num_prompts_truncates():
    a = [p.id for p in load_workload("humaneval", num_prompts=10, seed=3)]
    b = [p.id for p in load_workload("humaneval", num_prompts=10, seed=3)]
    c = [p.id for p in load_workload("humaneval", num_prompts=10, seed=4)]
    assert a == b and a != c and len(a) == 10


def test_jsonl_prompt_and_messages(tmp_path):
    path = tmp_path / "w.jsonl"
    rows = [{"prompt": "hello", "id": "p1", "max_tokens": 5},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = {p.id: p for p in load_workload(f"jsonl:{path}")}
    assert prompts["p1"].max_tokens == 5
    assert prompts["p1"].chat_messages() == [{"role": "user", "content": "hello"}]
    assert prompts["line2"].chat_messages()[1] == {"role": "user", "content": "u"}
    with pytest.raises(ValueError, match="--endpoint chat"):
        prompts["line2"].completion_prompt()


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_workload(f"jsonl:{bad}")
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload("nope")


def test_synthetic_lengths():
    prompts = load_workload("synthetic:32,64", num_prompts=5, seed=1)
    assert len(prompts) == 5
    assert all(len(p.prompt.split()) == 32 and p.max_tokens == 64 for p in prompts)
    assert [p.prompt for p in prompts] == [p.prompt for p in
                                           load_workload("synthetic:32,64", num_prompts=5, seed=1)]
