"""fairseq-moe-serve with a model registry, against real uvicorn servers driven with httpx (in a
thread of this process, so that a version's engine can be made to fail; and one subprocess for
SIGHUP): the 90/10 split within binomial bounds, stickiness by request id and API key, a reload
under load that loses no request, a circuit breaker that trips and recovers, shadow copies that
never delay the answer, bad requests as 4xx, and the command's refusal of bad registries."""

import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import classifier_checkpoint, metric, train_spm  # noqa: E402

from fairseq_moe_cli.benchmark_serve import ServerProcess, free_port  # noqa: E402
from fairseq_moe_plugin.serve.app import ServeSettings, create_app  # noqa: E402
from fairseq_moe_plugin.serve.auth import ApiKeys  # noqa: E402
from fairseq_moe_plugin.serve.deployment import Deployment  # noqa: E402
from fairseq_moe_plugin.serve.engine import EngineOptions  # noqa: E402
from fairseq_moe_plugin.serve.metrics import ServeMetrics  # noqa: E402
from fairseq_moe_plugin.serve.registry import load_registry  # noqa: E402

KEYS = ("key-a", "key-b", "key-c", "key-d")
BODY = {"texts": ["the cat sat"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A sentencepiece model, two tiny classifiers (different seeds) and a key file."""
    root = tmp_path_factory.mktemp("registry")
    spm = train_spm(root)
    keys = root / "keys.txt"
    keys.write_text("\n".join(KEYS) + "\n")
    return {"root": root, "spm": spm, "keys": keys,
            "a": classifier_checkpoint(root, root / "dict.txt", name="a", seed=0),
            "b": classifier_checkpoint(root, root / "dict.txt", name="b", seed=1)}  # fmt: skip


def write_registry(path, versions: dict, breaker: dict | None = None):
    model = {"versions": versions, **({"breaker": breaker} if breaker else {})}
    path.write_text(json.dumps({"models": {"cls": model}}))
    return path


class ThreadServer:
    """The app of a registry under uvicorn in a thread of this process."""

    def __init__(self, registry, spm, keys, max_wait_ms=2.0):
        settings = ServeSettings(max_wait_ms=max_wait_ms)
        self.deployment = Deployment.start(load_registry(registry),
                                           EngineOptions(spm_model=str(spm)), ServeMetrics(),
                                           settings)  # fmt: skip
        app = create_app(self.deployment, settings, ApiKeys(keys))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                log_config=None)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "no start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)

    def engine(self, version):
        return self.deployment.versions[("cls", version)].engine

    def metrics(self):
        return httpx.get(self.url + "/metrics", headers={"X-API-Key": KEYS[0]}).text


def send_many(url, bodies_and_headers, concurrency=16):
    """POST /v1/classify for every (body, headers), ``concurrency`` at a time; the responses."""

    async def main():
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def one(body, headers):
                async with limit:
                    return await client.post("/v1/classify", json=body, headers=headers)

            return await asyncio.gather(*(one(b, h) for b, h in bodies_and_headers))

    return asyncio.run(main())


def version_of(r):
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == r.json()["version"]
    assert r.headers["X-Model"] == r.json()["model"] == "cls"
    return r.json()["version"]


@pytest.fixture
def split_server(models, tmp_path):
    path = write_registry(tmp_path / "models.json",
                          {"v1": {"checkpoint": str(models["a"]), "weight": 90},
                           "v2": {"checkpoint": str(models["b"]), "weight": 10}})  # fmt: skip
    server = ThreadServer(path, models["spm"], KEYS)
    server.registry = path
    yield server
    server.stop()


@pytest.mark.slow
def test_split_is_90_10_within_binomial_bounds_and_sticky(split_server):
    n, p = 1000, 0.1
    key = {"X-API-Key": KEYS[0]}
    responses = send_many(split_server.url, [(BODY, {**key, "X-Request-ID": f"req-{i}"})
                                             for i in range(n)])  # fmt: skip
    versions = [version_of(r) for r in responses]
    bound = 4.5 * math.sqrt(n * p * (1 - p))  # 4.5 sigma of Binomial(1000, 0.1): 42.7
    assert abs(versions.count("v2") - n * p) <= bound, versions.count("v2")
    assert versions.count("v1") + versions.count("v2") == n
    # sticky: the same request id, and the same API key (no id), always the same version
    ids = [f"req-{i}" for i in range(30)]
    again = send_many(split_server.url, [(BODY, {**key, "X-Request-ID": rid})
                                         for rid in ids for _ in range(5)])  # fmt: skip
    for i, rid in enumerate(ids):
        assert {version_of(r) for r in again[5 * i : 5 * i + 5]} == {versions[i]}, rid
    by_key = send_many(split_server.url, [(BODY, {"X-API-Key": k}) for k in KEYS for _ in range(8)])
    for i, k in enumerate(KEYS):
        assert len({version_of(r) for r in by_key[8 * i : 8 * i + 8]}) == 1, k
    text = split_server.metrics()
    total = sum(metric(text, "fairseq_moe_version_requests_total", model="cls", version=v,
                       how="split") for v in ("v1", "v2"))  # fmt: skip
    assert total == n + len(again) + len(by_key)
    assert metric(text, "fairseq_moe_request_latency_seconds_count", route="/v1/classify",
                  model="cls", version="v2") == versions.count("v2") + sum(
        version_of(r) == "v2" for r in again + by_key)  # fmt: skip
    assert metric(text, "fairseq_moe_version_share", model="cls", version="v2") == 0.1


def test_healthz_lists_versions_and_bad_requests_are_4xx(split_server):
    health = httpx.get(split_server.url + "/healthz").json()
    versions = health["models"]["cls"]["versions"]
    assert {v: (versions[v]["weight"], versions[v]["share"]) for v in versions} == {
        "v1": (90, 0.9), "v2": (10, 0.1)}  # fmt: skip
    for v in versions.values():
        assert v["engine"] == "torch" and v["shadow"] is False and v["kind"] == "classification"
        assert v["breaker"]["state"] == "closed" and v["checkpoint"].endswith(".pt")
        assert v["memory"]["parameter_mib"] > 0 and "rss_delta_mib" in v["memory"]
    assert health["kind"] == "classification"  # one model: its description at the top level
    key = {"X-API-Key": KEYS[0]}
    cases = [({**BODY, "model": "nope"}, 404, "unknown_model"),
             ({**BODY, "version": "v9"}, 404, "unknown_version"),
             ({**BODY, "model": 3}, 422, "wrong_type"),
             ({**BODY, "version": ["v1"]}, 422, "wrong_type"),
             ({"texts": [], "version": "v2"}, 422, "empty_texts")]  # fmt: skip
    for body, status, kind in cases:
        r = httpx.post(split_server.url + "/v1/classify", json=body, headers=key)
        assert (r.status_code, r.json()["error"]["kind"]) == (status, kind), r.text
    assert "['v1', 'v2']" in httpx.post(split_server.url + "/v1/classify", headers=key,
                                        json={**BODY, "version": "v9"}).json()["error"]["message"]  # fmt: skip
    r = httpx.post(split_server.url + "/v1/classify", json={**BODY, "version": "v2"}, headers=key)
    assert version_of(r) == "v2"
    text = split_server.metrics()
    assert metric(text, "fairseq_moe_errors_total", kind="empty_texts", model="cls",
                  version="v2") == 1  # fmt: skip
    assert metric(text, "fairseq_moe_errors_total", kind="unknown_model", model="") == 1


@pytest.mark.slow
def test_reload_under_load_loses_no_request(split_server, models):
    path, url = split_server.registry, split_server.url
    key = {"X-API-Key": KEYS[0]}
    v1_engine = split_server.engine("v1")
    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            results.extend(send_many(url, [(BODY, {**key, "X-Request-ID": f"l{len(results)}-{i}"})
                                           for i in range(16)], concurrency=8))  # fmt: skip

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(0.5)
        steps = [  # re-weight and add v3 (a new checkpoint), remove v2
            {"v1": {"checkpoint": str(models["a"]), "weight": 1},
             "v3": {"checkpoint": str(models["b"]), "weight": 1}},
            {"v1": {"checkpoint": str(models["a"]), "weight": 3},
             "v2": {"checkpoint": str(models["b"]), "weight": 1}},
        ]  # fmt: skip
        for versions in steps:
            write_registry(path, versions)
            r = httpx.post(url + "/admin/reload", headers=key, timeout=120)
            assert r.status_code == 200, r.text
            mark = len(results)  # one batch of 16 may have started before the reload
            deadline = time.monotonic() + 60
            while len(results) < mark + 48 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = {version_of(x) for x in results[mark + 16 : mark + 48]}
            assert seen <= set(versions), seen
        assert r.json()["kept"] == ["cls/v1"] and r.json()["removed"] == ["cls/v3"]
        write_registry(path, {"v1": {"checkpoint": str(models["a"]), "weight": -1}})
        r = httpx.post(url + "/admin/reload", headers=key)
        assert r.status_code == 422 and r.json()["error"]["kind"] == "invalid_registry"
        assert "models.cls.versions.v1.weight: must be >= 0, got -1" in r.json()["error"]["message"]
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join()
    assert len(results) > 50
    assert all(r.status_code == 200 for r in results), [
        r.text for r in results if r.status_code != 200
    ]
    assert {version_of(r) for r in results} == {"v1", "v2", "v3"}
    assert split_server.engine("v1") is v1_engine  # never reloaded
    assert sorted(httpx.get(url + "/healthz").json()["models"]["cls"]["versions"]) == ["v1", "v2"]
    text = split_server.metrics()
    assert metric(text, "fairseq_moe_reloads_total", outcome="ok") == 2
    assert metric(text, "fairseq_moe_reloads_total", outcome="refused") == 1
    assert 'fairseq_moe_breaker_open{model="cls",version="v3"}' not in text  # its gauges went


@pytest.mark.slow
def test_breaker_trips_on_a_failing_version_and_recovers(models, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fairseq_moe_plugin.serve")
    breaker = {"window": 10, "min_requests": 4, "max_error_rate": 0.5, "cooldown_s": 3.0,
               "probe_requests": 2}  # fmt: skip
    path = write_registry(tmp_path / "models.yaml",
                          {"v1": {"checkpoint": str(models["a"]), "weight": 1},
                           "v2": {"checkpoint": str(models["b"]), "weight": 1}}, breaker)  # fmt: skip
    server = ThreadServer(path, models["spm"], KEYS)
    key = {"X-API-Key": KEYS[0]}
    try:
        healthy_run = server.engine("v2").run

        def broken(key, items):
            raise RuntimeError("v2 is broken")

        server.engine("v2").run = broken
        first = send_many(server.url, [(BODY, {**key, "X-Request-ID": f"a{i}"}) for i in range(30)],
                          concurrency=1)  # fmt: skip
        failed = [r for r in first if r.status_code == 500]
        assert len(failed) == 4  # the window's minimum, then v2 left the split
        assert all("model cls version v2" in r.json()["error"]["message"] for r in failed)
        assert all(version_of(r) == "v1" for r in first if r.status_code != 500)
        text = server.metrics()
        assert metric(text, "fairseq_moe_breaker_open", model="cls", version="v2") == 1
        assert metric(text, "fairseq_moe_breaker_trips_total", model="cls", version="v2") == 1
        assert metric(text, "fairseq_moe_version_share", model="cls", version="v1") == 1
        assert metric(text, "fairseq_moe_errors_total", kind="internal", model="cls",
                      version="v2") == 4  # fmt: skip
        assert any("circuit breaker OPEN: model cls version v2" in m and "goes to v1" in m
                   for m in caplog.messages), caplog.messages  # fmt: skip
        r = httpx.post(server.url + "/v1/classify", json={**BODY, "version": "v2"}, headers=key)
        assert r.status_code == 503 and r.json()["error"]["kind"] == "version_unavailable"
        assert (
            "circuit breaker is open" in r.json()["error"]["message"] and r.headers["Retry-After"]
        )
        assert httpx.get(server.url + "/healthz").json()["status"] == "degraded"
        server.engine("v2").run = healthy_run
        time.sleep(3.1)  # the cool-down: half-open, probes close it
        probes = send_many(server.url, [({**BODY, "version": "v2"}, key)] * 2, concurrency=1)
        assert [version_of(r) for r in probes] == ["v2", "v2"]
        assert any("circuit breaker closed: model cls version v2" in m for m in caplog.messages)
        assert metric(server.metrics(), "fairseq_moe_breaker_open", model="cls", version="v2") == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_shadow_gets_copies_that_never_delay_or_fail_the_answer(models, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fairseq_moe_plugin.serve.shadow")
    path = write_registry(tmp_path / "models.json",
                          {"v1": {"checkpoint": str(models["a"])},
                           "s": {"checkpoint": str(models["a"]), "shadow": True}})  # fmt: skip
    server = ThreadServer(path, models["spm"], KEYS)
    key = {"X-API-Key": KEYS[0]}
    try:
        answers = send_many(server.url, [(BODY, key)] * 10, concurrency=2)
        assert [version_of(r) for r in answers] == ["v1"] * 10
        time.sleep(0.5)
        text = server.metrics()
        assert metric(text, "fairseq_moe_shadow_requests_total", model="cls", version="s",
                      outcome="agree") == 10  # the same checkpoint: the same answers  # fmt: skip
        assert sum("shadow model cls version s" in m for m in caplog.messages) == 10
        shadow_engine = server.engine("s")

        def slow_then_fail(key, items):
            time.sleep(2.0)
            raise RuntimeError("shadow broke")

        shadow_engine.run = slow_then_fail
        start = time.monotonic()
        r = httpx.post(server.url + "/v1/classify", json=BODY, headers=key, timeout=60)
        assert version_of(r) == "v1" and time.monotonic() - start < 1.5
        time.sleep(2.5)
        text = server.metrics()
        assert metric(text, "fairseq_moe_shadow_requests_total", model="cls", version="s",
                      outcome="error") == 1  # fmt: skip
    finally:
        server.stop()


def test_serve_command_refuses_bad_registries(models, tmp_path, capsys):
    from fairseq_moe_cli.serve import main

    bad = tmp_path / "bad.yaml"
    cases = [
        ("models:\n  cls:\n    versions:\n      v1: {checkpoint: nope.pt}\n",
         f"registry {bad}: models.cls.versions.v1.checkpoint: {tmp_path}/nope.pt: no such checkpoint file or ONNX folder"),
        (f"models:\n  cls:\n    versions:\n      v1: {{checkpoint: {models['a']}}}\n"
         f"      v1: {{checkpoint: {models['b']}}}\n", "duplicate key 'v1' (line 5)"),
        (f"models:\n  cls:\n    versions:\n      v1: {{checkpoint: {models['a']}, weight: 0}}\n",
         "models.cls.versions: the weights sum to 0"),
        (f"models:\n  cls:\n    versions:\n      v1: {{checkpoint: {models['a']}, weight: -3}}\n",
         "models.cls.versions.v1.weight: must be >= 0, got -3"),
        (f"models:\n  cls:\n    versions:\n      v1: {{checkpoint: {models['a']}, colour: 1}}\n",
         "models.cls.versions.v1: unknown key(s) ['colour']"),
        (f"models:\n  cls:\n    versions:\n      v1: {{checkpoint: {models['spm']}}}\n",
         "model cls version v1: "),  # a file that is no checkpoint
    ]  # fmt: skip
    for text, message in cases:
        bad.write_text(text)
        assert main(["--registry", str(bad)]) == 2, text
        assert message in capsys.readouterr().err, text
    assert main([]) == 2 and "exactly one of CHECKPOINT and --registry" in capsys.readouterr().err
    assert main([str(models["a"]), "--registry", str(bad)]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_onnx_engine_missing_is_a_clear_error(models, monkeypatch):
    from fairseq_moe_plugin.checkpoint_io import CheckpointError
    from fairseq_moe_plugin.serve.engine import load_engine

    monkeypatch.setitem(sys.modules, "fairseq_moe_plugin.serve.onnx_translation", None)
    with pytest.raises(CheckpointError, match="engine onnx is not available"):
        load_engine(str(models["a"]), EngineOptions(engine="onnx"))


@pytest.mark.slow
def test_sighup_reloads_and_a_bad_file_is_logged_and_refused(models, tmp_path):
    path = write_registry(tmp_path / "models.json",
                          {"v1": {"checkpoint": str(models["a"]), "weight": 1}})  # fmt: skip
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fairseq_moe_cli.serve", "--registry", str(path), "--port",
           str(port), "--threads", "1", "--spm-model", str(models["spm"])]  # fmt: skip
    server = ServerProcess(cmd, port, tmp_path / "server.log", 120, env=env)

    def versions():
        return httpx.get(server.url + "/healthz").json()["models"]["cls"]["versions"]

    def wait_for(condition):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)

    try:
        write_registry(path, {"v1": {"checkpoint": str(models["a"]), "weight": 1},
                              "v2": {"checkpoint": str(models["b"]), "weight": 3}})  # fmt: skip
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "v2" in versions())
        assert versions()["v2"]["share"] == 0.75
        path.write_text('{"models": {"cls": {"versions": {"v1": {"checkpoint": "gone.pt"}}}}}')
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: reload refused" in server.output())
        assert "models.cls.versions.v1.checkpoint" in server.output()
        assert sorted(versions()) == ["v1", "v2"]
        r = httpx.post(server.url + "/v1/classify", json={**BODY, "version": "v2"})
        assert version_of(r) == "v2"
    finally:
        assert server.stop() == 0, server.output()
