"""The openai-compatible explainer (atlas/labels/llm.py) against a small OpenAI-compatible HTTP
server started by the test: request shape, retries with backoff, the answer cache (a rerun and an
interrupted run cost nothing twice), the concurrency limit, clear errors, and detection scores on
the tiny world checked against a brute-force count."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from atlas import analyze
from atlas.cli import main
from atlas.config import load_config
from atlas.errors import AtlasError, ConfigError
from atlas.labels import data as label_data
from atlas.labels.llm import AnswerCache, ChatClient, OpenAICompatible, parse_detection
from atlas.saes import load_sae
from atlas.store import ActivationStore
from support import llm_config, tiny_yaml, write_sae

LABEL = "the word park <b>"


class FakeLLM:
    """An OpenAI-compatible /v1/chat/completions: explains every feature as LABEL and, asked to
    detect, says every excerpt fires. `fail` holds HTTP statuses to answer the next requests with;
    after `broken_after` good answers it answers 400 for good."""

    def __init__(self, delay: float = 0.0):
        self.requests: list[dict] = []
        self.fail: list[int] = []
        self.broken_after: int | None = None
        self.delay = delay
        self.inflight = self.max_inflight = self.answered = self.accepted = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    status = fake.fail.pop(0) if fake.fail else 200
                    if fake.broken_after is not None and fake.accepted >= fake.broken_after:
                        status = 400
                    fake.accepted += status == 200
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                time.sleep(fake.delay)
                with fake.lock:
                    fake.inflight -= 1
                    if status == 200:
                        fake.answered += 1
                if status != 200:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "nope"}')
                    return
                user = body["messages"][-1]["content"]
                if user.startswith("Explanation:"):
                    content = json.dumps([1] * len(re.findall(r"^\d+\. ", user, re.M)))
                else:
                    content = f"Explanation: {LABEL}\n(more words the label leaves out)"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    server = FakeLLM()
    yield server
    server.close()


def client(llm: FakeLLM, cache: Path | None, **kw) -> ChatClient:
    api_key = kw.pop("api_key", "")
    return ChatClient(llm_config(llm.base_url, **kw), AnswerCache(cache), api_key, backoff=0.01)


def test_request_shape_cache_and_key(llm, tmp_path):
    c = client(llm, tmp_path / "cache", api_key="sekrit")
    assert c.complete("sys", "hello", 10) == f"Explanation: {LABEL}\n(more words the label leaves out)"
    (req,) = llm.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekrit"
    assert req["body"]["model"] == "m" and req["body"]["messages"][1] == {"role": "user", "content": "hello"}
    assert c.complete("sys", "hello", 10) and len(llm.requests) == 1                # cached
    assert client(llm, tmp_path / "cache").complete("sys", "hello", 10) and len(llm.requests) == 1  # on disk
    assert "sekrit" not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


def test_retries_with_backoff_then_gives_up(llm):
    llm.fail = [503, 429, 500]
    assert client(llm, None, retries=3).complete("s", "u", 5)
    assert len(llm.requests) == 4
    llm.fail = [500] * 10
    with pytest.raises(AtlasError, match=r"HTTP 500 after 3 tries"):
        client(llm, None, retries=2).complete("s", "v", 5)
    assert len(llm.requests) == 4 + 3


def test_other_http_errors_stop_at_once_with_one_line(llm):
    llm.fail = [401]
    with pytest.raises(AtlasError) as e:
        client(llm, None, retries=5).complete("s", "u", 5)
    assert "HTTP 401" in str(e.value) and "\n" not in str(e.value) and len(llm.requests) == 1
    with pytest.raises(AtlasError, match="after 1 tries"):
        ChatClient(llm_config("http://127.0.0.1:9/v1", retries=0, timeout=2), AnswerCache(None)).complete("s", "u", 5)


def test_concurrency_is_limited(tmp_path):
    from atlas.labels import Evidence

    slow = FakeLLM(delay=0.05)
    try:
        ex = OpenAICompatible(llm_config(slow.base_url, concurrency=3), backoff=0.01)
        evidence = [Evidence(i, False, 0.01, 1.0, windows=[[1, 2, 3]], window_acts=[[0.0, 1.0, 0.0]]) for i in range(12)]
        labels = ex.explain(evidence, ["a", "b", "c", "d"])
        assert [x.label for x in labels] == [LABEL] * 12 and 2 <= slow.max_inflight <= 3
        assert "<<c>>" in slow.requests[0]["body"]["messages"][1]["content"]      # the active token is marked
    finally:
        slow.close()


def test_api_key_variable_must_exist(monkeypatch, tmp_path):
    monkeypatch.delenv("ATLAS_TEST_KEY", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("analyze:\n  explainer: openai-compatible\n  explainer_base_url: http://127.0.0.1:9/v1\n"
                   "  explainer_model: m\n  explainer_api_key_env: ATLAS_TEST_KEY\n")
    a = load_config(cfg).analyze
    with pytest.raises(ConfigError, match="environment variable ATLAS_TEST_KEY is not set"):
        OpenAICompatible.from_config(a, None)
    monkeypatch.setenv("ATLAS_TEST_KEY", "k")
    assert OpenAICompatible.from_config(a, None).client.api_key == "k"


def test_parse_detection():
    assert parse_detection("[1, 0, 1]", 3) == [True, False, True]
    assert parse_detection("Sure: [1,0]\n", 2) == [True, False]
    assert parse_detection("1 0 0 1", 4) == [True, False, False, True]
    assert parse_detection("[1, 0]", 3) is None and parse_detection("no idea", 2) is None


# ---------------------------------------------------------------------------------------------
# End to end on the tiny world


@pytest.fixture(scope="module")
def tiny(tiny_world, tmp_path_factory):

    root = tmp_path_factory.mktemp("llm")
    tiny_yaml(tiny_world, root, corpus={"n_tokens": 8192}, sae={"d_sae": 96, "k": 6}, analyze={"batch_tokens": 1000})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["collect", "--config", "tiny.yaml"]) == 0
        write_sae(root / "runs" / "tiny" / "sae", 64, 96, 6)
    finally:
        os.chdir(cwd)
    return root


def test_analyze_with_an_llm_scores_by_detection_and_caches(tiny, llm, monkeypatch):
    monkeypatch.chdir(tiny)
    sets = ["analyze.explainer=openai-compatible", f"analyze.explainer_base_url={llm.base_url}",
            "analyze.explainer_model=tiny", "analyze.explainer_detection_contexts=8"]
    cfg = load_config("tiny.yaml", sets)

    # interrupted: the endpoint breaks after 20 answers; the run stops with one clear error
    llm.broken_after = 20
    with pytest.raises(AtlasError, match="HTTP 400"):
        analyze.run(cfg)
    first = llm.answered
    assert first == 20
    llm.broken_after = None
    out = analyze.run(cfg)
    total = llm.answered
    feats = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("features-*.parquet"))], ignore_index=True)
    live = feats[~feats.is_dead]
    assert (live.label == LABEL).all() and (live.label_source == "openai-compatible").all()
    assert (live.label_rule == "").all()

    # detection: the judge says every excerpt fires, so recall is 1 and precision is the share of the
    # shown excerpts that fire; the firing ones are one per score-split context the feature fires in
    with ActivationStore(Path("runs/tiny/activations.h5")) as store:
        dense = load_sae(Path("runs/tiny/sae")).encode(torch.from_numpy(store.read(0, store.n_tokens))).numpy()
        L, n_ctx = store.ctx_len, store.n_contexts
    dense[::L] = 0
    score_ctx = np.array([c for c in range(n_ctx) if (c // label_data.BLOCK) % 2 == 1])
    detected = 0
    for r in live.itertuples():
        fires_in = int(sum(dense[c * L:(c + 1) * L, r.feature_id].max() > 0 for c in score_ctx))
        detected += fires_in > 0
        assert r.heldout_fired == min(4, fires_in), r.feature_id
        if fires_in == 0:
            assert np.isnan(r.label_f1) and r.label_scoring == ""
            continue
        assert r.label_scoring == "detection" and r.label_recall == 1.0
        assert r.heldout_fired <= r.label_matched <= 8
        assert r.label_precision == pytest.approx(r.heldout_fired / r.label_matched)

    # one explanation per live feature, one detection per feature that fires on the score split; the 20
    # answers of the interrupted run were not asked again
    assert total == len(live) + detected

    # a forced rerun asks nothing
    analyze.run(cfg, force=True)
    assert llm.answered == total
