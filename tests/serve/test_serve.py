"""fairseq-moe-serve (fairseq_moe_plugin/serve, fairseq_moe_cli/serve.py) against real uvicorn
processes driven with httpx: translation with API keys, classification on an open server, every
kind of bad input as a 4xx JSON error, batching and routing metrics, graceful shutdown on SIGTERM;
in-process (FastAPI's TestClient): a corrupted router served through the fallback expert, a
sentence-pair classifier, a dense bilingual translation model, an int8 encrypted checkpoint; the
batcher, the key file and the command's refusals on their own; and the load-test command
(fairseq-moe-benchmark-serve) on a tiny model."""

import asyncio
import json
import logging
import math
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from serve_helpers import (  # noqa: E402
    BAD_INPUTS,
    GOOD,
    KEY,
    LABELS,
    SHORT,
    Server,
    classifier_checkpoint,
    corrupt_router,
    dense_translation_checkpoint,
    error_kind,
    in_process_app,
    metric,
    post,
    sentences,
    train_spm,
    translation_checkpoint,
)

from fairseq_moe_plugin.serve.auth import ApiKeys, read_api_keys  # noqa: E402
from fairseq_moe_plugin.serve.batching import DynamicBatcher  # noqa: E402

MT_FLAGS = ["--max-wait-ms", 200, "--max-len-b", 6, "--max-texts", 4, "--max-text-tokens", 24,
            "--max-text-chars", 200, "--max-beam", 4, "--beam", 2, "--max-body-bytes", 20000]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A sentencepiece model and four tiny checkpoints with random weights."""
    root = tmp_path_factory.mktemp("serve")
    spm = train_spm(root)
    return {
        "root": root,
        "spm": spm,
        "mt": translation_checkpoint(root, root / "dict.txt"),
        "cls": classifier_checkpoint(root, root / "dict.txt"),
        "pair": classifier_checkpoint(root, root / "dict.txt", name="pair", pairs=True),
    }


@pytest.fixture(scope="module")
def mt_server(models):
    keys = models["root"] / "keys.txt"
    keys.write_text(f"# serving keys\n\n{KEY}\n  other-key  \n")
    server = Server(models["mt"], "--spm-model", models["spm"], "--api-key-file", keys,
                    *MT_FLAGS, log=models["root"] / "mt_server.log")  # fmt: skip
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def cls_server(models):
    server = Server(models["cls"], "--spm-model", models["spm"], "--max-wait-ms", 5,
                    log=models["root"] / "cls_server.log")  # fmt: skip
    yield server
    assert server.stop() == 0, server.output()


def test_translation_needs_a_key_and_translates(mt_server):
    body = {"texts": ["the cat sat on a mat", "red bird"], "target_lang": "fr", "beam": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        r = httpx.post(mt_server.url + "/v1/translate", json=body, headers=headers)
        assert r.status_code == 401 and error_kind(r) == "unauthorized", r.text
    assert httpx.get(mt_server.url + "/metrics").status_code == 401
    health = httpx.get(mt_server.url + "/healthz").json()  # open without a key
    assert health["kind"] == "translation" and health["target_langs"] == ["de", "fr"]
    r = post(mt_server, "/v1/translate", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["source_lang"] == "en" and out["target_lang"] == "fr" and out["beam"] == 3
    assert len(out["translations"]) == 2 and all(isinstance(t, str) for t in out["translations"])
    r = post(mt_server, "/v1/translate", {"texts": ["big tree"], "target_lang": "de"}, key=None,
             headers={"X-API-Key": "other-key"})  # fmt: skip
    assert r.status_code == 200 and r.json()["beam"] == 2, r.text  # --beam is the default


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_4xx_json_error(mt_server, case):
    body, status, kind = BAD_INPUTS[case]
    headers = {"Authorization": f"Bearer {KEY}"}
    if isinstance(body, str):  # a content type, with a good JSON body
        headers["Content-Type"] = body
        r = httpx.post(mt_server.url + "/v1/translate", content=json.dumps(GOOD), headers=headers)
    elif isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        r = httpx.post(mt_server.url + "/v1/translate", content=body, headers=headers)
    else:
        r = post(mt_server, "/v1/translate", body)
    assert (r.status_code, error_kind(r)) == (status, kind), r.text
    assert r.json()["error"]["message"]
    if case == "over-long text (tokens)":
        assert "tokens" in r.json()["error"]["message"]
    if kind == "unknown_target_lang":
        assert r.json()["error"]["target_langs"] == ["de", "fr"]
        assert "['de', 'fr']" in r.json()["error"]["message"]


def test_server_survives_bad_input_and_counts_errors(mt_server):
    for case in ("empty list", "invalid JSON"):
        test_bad_input_is_a_4xx_json_error(mt_server, case)
    r = post(mt_server, "/v1/classify", {"texts": ["the cat"]})
    assert r.status_code == 404 and r.json()["error"]["serves"] == "/v1/translate", r.text
    assert post(mt_server, "/v1/nope", {}).status_code == 404
    assert post(mt_server, "/v1/translate", GOOD).status_code == 200
    text = httpx.get(mt_server.url + "/metrics", headers={"X-API-Key": KEY}).text
    assert metric(text, "fairseq_moe_errors_total", kind="empty_texts") >= 1
    assert metric(text, "fairseq_moe_errors_total", kind="route_not_served") == 1
    assert metric(text, "fairseq_moe_errors_total", kind="unauthorized") >= 1


def test_concurrent_requests_share_batches_and_routing_is_counted(mt_server):
    """Requests within --max-wait-ms form one batch per (target, beam); the encoder's routed
    tokens are exactly the tokens fed to the model; no fallback on a healthy router."""
    metrics = lambda: httpx.get(mt_server.url + "/metrics", headers={"X-API-Key": KEY}).text  # noqa: E731
    before = metrics()

    async def burst():
        async with httpx.AsyncClient(base_url=mt_server.url, timeout=60,
                                     headers={"X-API-Key": KEY}) as client:  # fmt: skip
            bodies = [{"texts": [s], "target_lang": lang, "beam": 2}
                      for s, lang in zip(SHORT, ["de", "fr"] * 3, strict=True)]  # fmt: skip
            return await asyncio.gather(*(client.post("/v1/translate", json=b) for b in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 6
    assert [r.json()["target_lang"] for r in responses] == ["de", "fr"] * 3
    after = metrics()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    route = {"route": "/v1/translate"}
    batches = delta("fairseq_moe_batch_size_requests_count", **route)
    assert delta("fairseq_moe_batch_size_requests_sum", **route) == 6
    assert batches < 6, "no two requests shared a batch"
    assert batches >= 2, "requests for two target languages shared a batch"
    tokens_in = delta("fairseq_moe_tokens_in_total", **route)
    assert tokens_in > 0 and delta("fairseq_moe_tokens_out_total", **route) >= 0
    for layer in ("encoder.layers.1", "decoder.layers.1"):
        routed = delta("fairseq_moe_routed_tokens_total", layer=layer)
        assert routed > 0
        experts = sum(delta("fairseq_moe_expert_tokens_total", layer=layer, expert=str(e))
                      for e in range(4))  # fmt: skip
        assert experts > 0
        mean_entropy = metric(after, "fairseq_moe_routing_entropy_mean_nats", layer=layer)
        assert 0 < mean_entropy <= math.log(4) + 1e-6
        assert metric(after, "fairseq_moe_fallback_tokens_total", layer=layer) == 0
        assert metric(after, "fairseq_moe_fallback_share", layer=layer) == 0
    assert delta("fairseq_moe_routed_tokens_total", layer="encoder.layers.1") == tokens_in
    assert metric(after, "fairseq_moe_request_latency_seconds_count", **route) >= 6


def test_classifier_on_an_open_server(cls_server):
    assert "the server is OPEN" in cls_server.output()
    r = post(cls_server, "/v1/classify", {"texts": ["the cat sat", "a big red house"]}, key=None)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["labels"] == list(LABELS) and len(out["predictions"]) == 2
    for p in out["predictions"]:
        assert p["label"] in LABELS and set(p["probabilities"]) == set(LABELS)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    r = post(cls_server, "/v1/classify", {"texts": [["the cat", "a dog"]]}, key=None)
    assert r.status_code == 422 and error_kind(r) == "wrong_input_form", r.text
    r = post(cls_server, "/v1/translate", {"texts": ["the cat"]}, key=None)
    assert r.status_code == 404 and "/v1/classify" in r.json()["error"]["message"]
    assert httpx.get(cls_server.url + "/metrics").status_code == 200  # open


def test_corrupted_router_falls_back_and_is_counted(models, caplog):
    """inf in a router weight: every token's logits are non-finite; the fallback expert takes
    them, answers stay finite, /metrics shows share 1 and the event is logged."""
    from fastapi.testclient import TestClient

    bad = models["root"] / "bad_router.pt"
    corrupt_router(models["cls"], bad)
    caplog.set_level(logging.WARNING, logger="fairseq_moe_plugin.serve")
    with TestClient(in_process_app(bad, models["spm"], fallback_expert=0)) as client:
        (layer,) = client.get("/healthz").json()["moe_layers"]  # moe_roberta_tiny: one layer
        r = client.post("/v1/classify", json={"texts": ["the cat sat", "a dog"]})
        assert r.status_code == 200, r.text
        for p in r.json()["predictions"]:
            assert all(math.isfinite(v) for v in p["probabilities"].values())
        text = client.get("/metrics").text
    routed = metric(text, "fairseq_moe_routed_tokens_total", layer=layer)
    assert routed > 0, text
    assert metric(text, "fairseq_moe_fallback_tokens_total", layer=layer) == routed
    assert metric(text, "fairseq_moe_fallback_share", layer=layer) == 1.0
    assert metric(text, "fairseq_moe_expert_tokens_total", layer=layer, expert="0") == routed
    assert any("router fallback" in m and layer in m for m in caplog.messages), caplog.messages


def test_sentence_pair_classifier(models):
    from fastapi.testclient import TestClient

    with TestClient(in_process_app(models["pair"], models["spm"])) as client:
        r = client.post("/v1/classify", json={"texts": [["the cat", "a dog"], ["red", "blue"]]})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
        r = client.post("/v1/classify", json={"texts": ["the cat"]})
        assert r.status_code == 422 and "sentence pairs" in r.json()["error"]["message"]
        r = client.post("/v1/classify", json={"texts": [["the cat"]]})
        assert r.status_code == 422 and error_kind(r) == "wrong_type"


def test_dense_bilingual_translation_checkpoint(models):
    """fairseq's ``translation`` task (one pair, no language tokens) and a dense model: served,
    with no routing series."""
    from fastapi.testclient import TestClient

    path = dense_translation_checkpoint(models["root"], models["root"] / "dict.txt")
    with TestClient(in_process_app(path, models["spm"], max_len_b=5)) as client:
        health = client.get("/healthz").json()
        assert health["moe_layers"] == {} and health["target_langs"] == ["de"]
        r = client.post("/v1/translate", json={"texts": ["the cat", "a red bird"]})
        assert r.status_code == 200, r.text
        assert r.json()["source_lang"] == "en" and r.json()["target_lang"] == "de"
        r = client.post("/v1/translate", json={"texts": ["the cat"], "target_lang": "fr"})
        assert r.status_code == 422 and r.json()["error"]["target_langs"] == ["de"]
        text = client.get("/metrics").text
    assert metric(text, "fairseq_moe_tokens_in_total", route="/v1/translate") > 0
    assert "fairseq_moe_routed_tokens_total{" not in text


def test_int8_encrypted_checkpoint_is_served(models, tmp_path, capsys):
    """fairseq-moe-quantize's int8 output, encrypted: served with --decrypt-key-file (the
    predictions close to fp32's), refused with a clear error without it."""
    from fastapi.testclient import TestClient

    from fairseq_moe_cli.quantize import main as quantize
    from fairseq_moe_cli.serve import main as serve
    from fairseq_moe_plugin.deploy.encryption import new_key_file

    key = new_key_file(tmp_path / "model.key")
    int8 = tmp_path / "cls.int8.pt"
    assert quantize([str(models["cls"]), str(int8), "--int8", "dynamic",
                     "--encrypt-key-file", str(key)]) == 0  # fmt: skip
    body = {"texts": ["the cat sat", "a big red house"]}
    probs = {}
    for name, path, options in (
        ("fp32", models["cls"], {}),
        ("int8", int8, {"key_file": str(key)}),
    ):
        with TestClient(in_process_app(path, models["spm"], **options)) as client:
            r = client.post("/v1/classify", json=body)
            assert r.status_code == 200, r.text
            probs[name] = [p["probabilities"] for p in r.json()["predictions"]]
    for p32, p8 in zip(probs["fp32"], probs["int8"], strict=True):
        assert all(abs(p32[label] - p8[label]) < 0.05 for label in LABELS), (p32, p8)
    capsys.readouterr()
    assert serve([str(int8)]) == 2
    assert "encrypted checkpoint" in capsys.readouterr().err


def test_sigterm_lets_the_request_in_flight_finish(models):
    """A request waiting in the batcher (--max-wait-ms 4000) when SIGTERM arrives gets its 200;
    /healthz answers meanwhile (the event loop is free); the server exits 0."""
    server = Server(models["cls"], "--spm-model", models["spm"], "--max-wait-ms", 4000,
                    log=models["root"] / "shutdown_server.log")  # fmt: skip
    body = json.dumps({"texts": ["the cat sat"]}).encode()
    request = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
               f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
               ).encode() + body  # fmt: skip
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(request)
            sent = time.monotonic()
            queued = 0
            while not queued and time.monotonic() - sent < 3.0:  # until the request is queued
                queued = httpx.get(server.url + "/healthz", timeout=5).json()["queue_texts"]
            assert queued == 1, "the request did not reach the batcher"
            server.proc.send_signal(signal.SIGTERM)
            while chunk := sock.recv(65536):
                reply += chunk
        waited = time.monotonic() - sent
    finally:
        status = server.stop()
    assert reply.startswith(b"HTTP/1.1 200"), (reply[:300], server.output())
    assert b'"predictions"' in reply and waited > 3.0  # answered after the batching window
    assert status == 0, server.output()
    assert "Shutting down" in server.output()


class FakeResult:
    def __init__(self, outputs):
        self.outputs = outputs


def test_batcher_groups_by_key_within_the_window_and_budget():
    calls = []

    def run(key, items):
        calls.append((key, list(items)))
        return FakeResult([f"{key}:{item}" for item in items])

    async def scenario(batcher, jobs):
        return await asyncio.gather(*(batcher.submit(key, items) for key, items in jobs))

    jobs = [("a", ["xx"]), ("b", ["yy"]), ("a", ["zz", "ww"]), ("a", ["q" * 5])]
    batcher = DynamicBatcher(run, max_wait=0.2, max_batch_tokens=8)
    outputs = asyncio.run(scenario(batcher, jobs))
    batcher.close()
    assert outputs == [["a:xx"], ["b:yy"], ["a:zz", "a:ww"], ["a:" + "q" * 5]]
    # "a": 3 items x 2 fit 8 padded tokens; the 5-long item would make 4 x 5: next batch
    assert calls == [("a", ["xx", "zz", "ww"]), ("b", ["yy"]), ("a", ["q" * 5])]

    calls.clear()
    batcher = DynamicBatcher(run, max_wait=0.0, max_batch_tokens=100)  # batching off
    asyncio.run(scenario(batcher, jobs))
    batcher.close()
    assert [len(items) for _, items in calls] == [1, 1, 2, 1]


def test_batcher_drains_on_close_and_isolates_a_failing_request():
    calls = []

    def run(key, items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("model failed")
        return FakeResult(list(items))

    batcher = DynamicBatcher(run, max_wait=30.0, max_batch_tokens=1000)
    jobs = [batcher.put("k", [text]) for text in ("0", "bad", "2")]
    start = time.monotonic()
    threading.Timer(0.2, batcher.close).start()  # long before the 30 s window ends
    assert jobs[0].future.result(timeout=10) == ["0"] and jobs[2].future.result() == ["2"]
    assert time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match="model failed"):
        jobs[1].future.result(timeout=1)
    assert calls == [["0", "bad", "2"], ["0"], ["bad"], ["2"]]  # the batch, then one by one
    with pytest.raises(Exception, match="shutting down"):
        batcher.put("k", ["late"])


def test_api_key_file_and_headers(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\n  alpha \nbeta\n")
    keys = ApiKeys(read_api_keys(path))
    assert keys.allows({"authorization": "Bearer alpha"})
    assert keys.allows({"authorization": "bearer beta"})
    assert keys.allows({"x-api-key": "beta"})
    for headers in ({}, {"authorization": "Basic alpha"}, {"x-api-key": "gamma"},
                    {"authorization": "Bearer "}, {"x-api-key": "# comment"}):  # fmt: skip
        assert not keys.allows(headers), headers
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_api_keys(path)


def test_serve_command_refuses_bad_setup(models, tmp_path, capsys):
    from fairseq_moe_cli.serve import main

    empty = tmp_path / "keys"
    empty.write_text("\n")
    cases = [
        ([str(tmp_path / "missing.pt")], "missing.pt: no such file"),
        ([str(models["cls"]), "--api-key-file", str(empty)], "holds no key"),
        ([str(models["cls"]), "--max-wait-ms", "-1"], "--max-wait-ms must be >= 0"),
        ([str(models["cls"]), "--beam", "8", "--max-beam", "4"], "larger than --max-beam"),
        ([str(models["spm"])], "cannot read"),  # not a checkpoint
        ([str(tmp_path)], "is a folder: serve an ONNX export folder"),
        ([str(models["cls"]), "--engine", "onnx"], "serves an ONNX export folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_benchmark_writes_json_and_table(models, tmp_path):
    from fairseq_moe_cli.benchmark_serve import main

    texts = tmp_path / "test.text"
    texts.write_text("\n".join(sentences(5, seed=2)) + "\n")
    out = tmp_path / "bench"
    argv = ["--checkpoint", f"tiny={models['cls']}", "--route", "classify", "--texts", str(texts),
            "--spm-model", str(models["spm"]), "--concurrency", "1", "2", "--requests", "4",
            "--warmup", "1", "--threads", "1", "--out-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "benchmark_serve.json").read_text())
    settings = {(r["batching"], r["concurrency"]) for r in report["settings"]}
    assert settings == {("on", 1), ("on", 2), ("off", 1), ("off", 2)}
    for row in report["settings"]:
        assert row["failed"] == 0 and row["requests_per_s"] > 0
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
        assert row["peak_rss_mib"] > 0 and row["server_exit_status"] == 0
    assert report["checkpoints"]["tiny"]["size_mib"] > 0
    table = (out / "benchmark_serve.md").read_text().splitlines()
    assert table[0].startswith("| checkpoint |") and len(table) == 2 + 4
