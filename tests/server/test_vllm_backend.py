"""`mtpserve serve --backend vllm`.

Part 1 runs everywhere (no vLLM needed): startup refusals of native-only flags, the install
hint when vLLM is missing, `server/` importing without vLLM, and HTTP 400 (OpenAI's error
schema, naming the field) for native-only request fields. The 400s are checked through the
engine-interface seam: `VllmBackend`'s own refusal logic behind the real app, with only
loading and submitting replaced by a test double (refusals happen before the engine).

Part 2 needs vLLM (skipped when `import vllm` fails; run it with the vLLM venv's python):
ONE `mtpserve serve --backend vllm` subprocess on the default model for the module, the
same OpenAI-client checks as the native backend, and greedy output compared with the
native engine's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import httpx
import pytest

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import RequestOutput
from mtpserve.server.app import ServerSettings, create_app
from mtpserve.server.cli import build_parser, explicit_flags, main
from mtpserve.server.vllm_backend import VllmBackend
from mtpserve.server.vllm_options import (INSTALL_HINT, BackendConfigError, VllmOptions,
                                          options_from_args)
from mtpserve.server.vllm_requests import check_vllm_request
from server_helpers import ServerThread, free_port

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


# -- part 1: no vLLM needed ----------------------------------------------------------------
def _serve_args(argv: list[str]) -> Namespace:
    parser = build_parser()
    args = parser.parse_args(["serve", *argv])
    args.explicit = explicit_flags(parser, ["serve", *argv])
    return args


def test_explicit_flags_are_told_apart_from_defaults():
    args = _serve_args(["--acceptance", "typical", "--port", "1"])
    assert {"acceptance", "port"} <= args.explicit
    assert "proposer" not in args.explicit and "tree" not in args.explicit


@pytest.mark.parametrize("flags, named", [
    (["--weights", "int4"], "--weights int4"),
    (["--tree", "chain4"], "--tree chain4"),
    (["--acceptance", "typical"], "--acceptance typical"),
    (["--typical-epsilon", "0.2"], "--typical-epsilon"),
    (["--proposer", "hybrid"], "--proposer hybrid"),
    (["--prefill-chunk", "64"], "--prefill-chunk"),
    (["--prefill-while-decoding", "256"], "--prefill-while-decoding"),
    (["--device", "cpu"], "--device cpu"),
    (["--dtype", "float64"], "--dtype float64"),
])
def test_vllm_refuses_native_only_startup_flags(flags, named, capsys):
    assert main(["serve", "--backend", "vllm", *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "--backend vllm cannot honour" in err
    assert "--backend native" in err


def test_vllm_refusal_lists_every_flag_before_importing_vllm(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # a refusal must not need vLLM
    assert main(["serve", "--backend", "vllm", "--tree", "chain2", "--weights", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--tree chain2" in err and "--weights int8" in err


def test_vllm_accepts_its_flags_and_native_defaults():
    # defaults (hybrid proposer, typical acceptance, auto tree/weights) are not refused
    opts = options_from_args(_serve_args([]), set())
    assert opts.proposer is None and opts.speculate == "auto"
    args = _serve_args(["--acceptance", "rejection", "--weights", "dense", "--proposer",
                        "ngram", "--tensor-parallel-size", "2", "--pipeline-parallel-size",
                        "2", "--max-num-seqs", "4", "--vllm-engine-args",
                        '{"enforce_eager": true}'])
    opts = options_from_args(args, args.explicit)
    assert (opts.proposer, opts.tensor_parallel_size, opts.pipeline_parallel_size,
            opts.max_num_seqs, opts.extra) == ("ngram", 2, 2, 4, {"enforce_eager": True})


@pytest.mark.parametrize("flags, msg", [
    (["--proposer", "ngram", "--heads", "x"], "--heads has no use"),
    (["--speculate", "off", "--heads", "x"], "--speculate off"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be >= 1"),
    (["--vllm-engine-args", "{nope"], "not JSON"),
    (["--vllm-engine-args", '{"model": "x"}'], "mtpserve's own flags"),
])
def test_vllm_refuses_inconsistent_flags(flags, msg):
    args = _serve_args(flags)
    with pytest.raises(BackendConfigError, match=msg):
        options_from_args(args, args.explicit)


def test_vllm_only_flags_refused_under_native(capsys):
    assert main(["serve", "--tensor-parallel-size", "2"]) == 2
    assert "only with --backend vllm" in capsys.readouterr().err


def test_missing_vllm_gives_the_install_hint(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    assert main(["serve", "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'mtpserve[vllm]'" in err and "pip install vllm" in err
    assert INSTALL_HINT in err


def test_server_imports_without_vllm():
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import mtpserve.server.cli, mtpserve.server.app, mtpserve.server.routes, "
            "mtpserve.server.vllm_backend\n"
            "mtpserve.server.cli.build_parser()\n"
            "assert sys.modules['vllm'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_request_refusal_rules():
    ok = SamplingParams(temperature=0.5, acceptance="rejection", speculate=True)
    check_vllm_request(ok, speculation=True)
    check_vllm_request(SamplingParams(temperature=0.0, acceptance="greedy"), True)
    check_vllm_request(SamplingParams(speculate=False), speculation=False)  # nothing to stop
    for params, field in [(SamplingParams(acceptance="typical"), "speculation.acceptance"),
                          (SamplingParams(typical_epsilon=0.1), "speculation.typical_epsilon"),
                          (SamplingParams(typical_delta=0.2), "speculation.typical_delta"),
                          (SamplingParams(speculate=False), "speculation.enabled")]:
        with pytest.raises(ValueError) as info:
            check_vllm_request(params, speculation=True)
        assert info.value.param == field


class _RefusalOnlyVllm(VllmBackend):
    """VllmBackend with loading and submitting replaced (test double): its refusal logic,
    `check_request`, is the real one. Allowed requests get one scripted token."""

    def __init__(self) -> None:
        super().__init__(VllmOptions(model=None, max_model_len=256, max_num_seqs=2))
        self.submitted: list[SamplingParams] = []

    def start(self) -> None:
        from mtpserve.decoding.model.checkpoint import default_model_path
        from mtpserve.decoding.model.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_gguf(default_model_path())
        self.model_name = "double"
        self.speculation_available = True
        self._alive = True

    def stop(self) -> None:
        self._alive = False

    @property
    def is_alive(self) -> bool:
        return getattr(self, "_alive", False)

    def submit(self, request_id, prompt_token_ids, params, on_output) -> None:
        self.check_request(params)  # what the real submit does first
        self.submitted.append(params)
        on_output(RequestOutput(request_id, [42], "x", len(prompt_token_ids), 1, True,
                                "length"))


@pytest.fixture(scope="module")
def refusal_server():
    backend = _RefusalOnlyVllm()
    srv = ServerThread(create_app(backend, ServerSettings(api_key="k"))).start()
    yield srv, backend
    srv.stop()


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("spec, field", [
    ({"acceptance": "typical"}, "speculation.acceptance"),
    ({"typical_epsilon": 0.1}, "speculation.typical_epsilon"),
    ({"typical_delta": 0.2}, "speculation.typical_delta"),
    ({"enabled": False}, "speculation.enabled"),
])
def test_native_only_request_fields_get_400_under_vllm(refusal_server, endpoint, spec, field):
    srv, backend = refusal_server
    body = {"max_tokens": 4, "temperature": 0.7, "speculation": spec}
    body.update({"prompt": "Hi"} if endpoint == COMPLETIONS
                else {"messages": [{"role": "user", "content": "Hi"}]})
    before = len(backend.submitted)
    r = httpx.post(srv.url + endpoint, json=body, headers={"Authorization": "Bearer k"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == field
    assert err["code"] == "unsupported_by_backend" and "vLLM backend" in err["message"]
    assert len(backend.submitted) == before  # refused before the engine


def test_vllm_supported_speculation_fields_pass(refusal_server):
    srv, backend = refusal_server
    h = {"Authorization": "Bearer k"}
    for spec, temp in [({"acceptance": "rejection"}, 0.7), ({"acceptance": "greedy"}, 0),
                       ({"enabled": True}, 0.5)]:
        r = httpx.post(srv.url + COMPLETIONS, headers=h, json={
            "prompt": "Hi", "max_tokens": 1, "temperature": temp, "speculation": spec})
        assert r.status_code == 200, r.text
    assert httpx.post(srv.url + COMPLETIONS, json={"prompt": "Hi"}).status_code == 401


def test_sampling_refused_where_vllm_cannot_verify_sampled_drafts(refusal_server):
    """vLLM's CPU build without triton-cpu garbles sampled speculative output: refused."""
    srv, backend = refusal_server
    h = {"Authorization": "Bearer k"}
    backend.sampled_speculation_ok = False
    try:
        for body in ({"prompt": "Hi", "temperature": 0.7}, {"prompt": "Hi"}):
            r = httpx.post(srv.url + COMPLETIONS, headers=h, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
            assert "--speculate off" in r.json()["error"]["message"]
        r = httpx.post(srv.url + COMPLETIONS, headers=h,
                       json={"prompt": "Hi", "temperature": 0, "max_tokens": 1})
        assert r.status_code == 200
    finally:
        backend.sampled_speculation_ok = True


# -- part 2: a real vLLM server (skipped without vLLM) -------------------------------------
PROMPTS = ["The three primary colors are", "def fibonacci(n):",
           "Paris is the capital of"]
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm")
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                   "1"))
    cmd = [sys.executable, "-m", "mtpserve.server.cli", "serve", "--backend", "vllm",
           "--port", str(port), "--max-model-len", "512", "--max-num-seqs", "4",
           "--dtype", "float32", "--drain-timeout", "5"]
    extra = os.environ.get("MTPSERVE_TEST_VLLM_ARGS")  # e.g. --speculate off
    if extra:
        cmd += extra.split()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + float(os.environ.get("MTPSERVE_TEST_VLLM_TIMEOUT", "900"))
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited {proc.returncode}:\n"
                            + log_path.read_text()[-6000:])
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM server not healthy in time:\n" + log_path.read_text()[-6000:])
            time.sleep(1)
        yield url, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        print("\n--- vLLM server log (tail) ---\n" + log_path.read_text()[-3000:])


@pytest.fixture(scope="module")
def oai(vllm_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=vllm_server[0] + "/v1", api_key="none", timeout=300)


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_vllm_models_and_completion(vllm_server, oai):
    url, _ = vllm_server
    models = oai.models.list()
    name = models.data[0].id
    assert name == "SmolLM2-135M-Instruct"
    before = _metric(url, "mtpserve_requests_total")
    r = oai.completions.create(model=name, prompt="The capital of France is", max_tokens=8,
                               temperature=0)
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens >= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    spec = r.model_extra["metrics"]["speculative_decoding"]
    assert spec["num_steps"] >= 1
    assert _metric(url, "mtpserve_requests_total") == before + 1
    assert _metric(url, "mtpserve_generation_tokens_total") >= r.usage.completion_tokens


def test_vllm_chat_and_streaming(oai):
    name = oai.models.list().data[0].id
    msgs = [{"role": "user", "content": "Name one primary color."}]
    plain = oai.chat.completions.create(model=name, messages=msgs, max_tokens=12,
                                        temperature=0)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].message.role == "assistant"
    stream = oai.chat.completions.create(model=name, messages=msgs, max_tokens=12,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == text  # greedy: streamed == plain
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens
    assert finish == plain.choices[0].finish_reason


def test_vllm_sampling_logprobs_stop_and_n(vllm_server, oai):
    url, _ = vllm_server
    name = oai.models.list().data[0].id
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0.8, "seed": 1}
    temperature = 0.8
    r = httpx.post(url + COMPLETIONS, json=body, timeout=300)
    if r.status_code == 400:  # vLLM CPU without triton-cpu, speculation on: refused
        assert r.json()["error"]["param"] == "temperature"
        temperature = 0
    else:
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    r = oai.completions.create(model=name, prompt="Once upon a time", max_tokens=6,
                               temperature=temperature, seed=1, n=2, logprobs=2)
    assert len(r.choices) == 2
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) >= 1
        assert all(len(t) >= 1 for t in c.logprobs.top_logprobs)
    r = oai.completions.create(model=name, prompt="1, 2, 3, 4,", max_tokens=20,
                               temperature=0, stop=[","])
    assert "," not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_vllm_bad_input_gets_400(vllm_server):
    url, _ = vllm_server
    r = httpx.post(url + COMPLETIONS, json={"prompt": "x", "temperature": 9}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": 100000,
                                           "temperature": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url + COMPLETIONS, timeout=30, json={
        "prompt": "x", "temperature": 0.5, "speculation": {"acceptance": "typical"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculation.acceptance"


def test_vllm_greedy_matches_native(vllm_server, oai, default_engine):
    """Greedy output of vLLM (fp32) vs the native engine (fp32 dense, speculation on).
    Both are exact greedy decoders of the same weights, so they agree except where
    floating-point rounding flips a near-tie; the first differing position is printed, and
    the common prefix before it must be non-trivial."""
    name = oai.models.list().data[0].id
    tok = default_engine.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    native = default_engine.generate(prompts, SamplingParams(max_tokens=GREEDY_TOKENS,
                                                             temperature=0.0,
                                                             ignore_eos=True))
    report = []
    for p, ids, nat in zip(PROMPTS, prompts, native):
        r = oai.completions.create(model=name, prompt=ids, max_tokens=GREEDY_TOKENS,
                                   temperature=0, logprobs=0,
                                   extra_body={"ignore_eos": True})
        got = r.choices[0].logprobs.tokens
        want = [tok.decode([t], skip_special_tokens=False) for t in nat["token_ids"]]
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is None and len(got) != len(want):
            first = min(len(got), len(want))
        report.append((p, first))
        if first is not None:
            print(f"greedy divergence for {p!r} at token {first}: vLLM {got[first:first + 3]}"
                  f" vs native {want[first:first + 3]}")
        assert first is None or first >= 8, (p, first, got, want)
    print("greedy vLLM vs native, first differing position per prompt:", report)
    assert sum(f is None for _, f in report) >= 2, report


def test_vllm_speculation_stats_and_metrics(vllm_server, oai):
    url, log_path = vllm_server
    name = oai.models.list().data[0].id
    before = _metric(url, "mtpserve_spec_decode_num_drafts_total")
    r = oai.completions.create(model=name, prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=24,
                               temperature=0, extra_body={"ignore_eos": True})
    spec = r.model_extra["metrics"]["speculative_decoding"]
    print("vLLM speculative_decoding:", json.dumps(spec))
    if "speculation off" in log_path.read_text():
        assert spec["num_spec_steps"] == 0
        return
    assert spec["num_spec_steps"] >= 1 and spec["num_draft_tokens"] >= spec["num_spec_steps"]
    assert spec["acceptance_rule"] == "greedy"
    assert spec["num_steps"] <= r.usage.completion_tokens
    after = _metric(url, "mtpserve_spec_decode_num_drafts_total")
    assert after - before == spec["num_spec_steps"]
