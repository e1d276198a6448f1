"""The model registry without a model (fairseq_moe_plugin/serve/registry.py, traffic.py,
breaker.py, dictionaries.py, deployment.py): file validation with the file and entry named, the
weighted sticky split, the breaker's state machine on a fake clock, dictionary sharing, and a
deployment of fake engines (routing, explicit versions, reload swap and drain)."""

import asyncio
import json
import math
import random

import pytest

pytest.importorskip("prometheus_client")

from fairseq_moe_plugin.serve import traffic  # noqa: E402
from fairseq_moe_plugin.serve.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker  # noqa: E402
from fairseq_moe_plugin.serve.registry import (  # noqa: E402
    BreakerConfig,
    RegistryError,
    load_registry,
)


def write(tmp_path, data, name="models.yaml"):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def ckpts(tmp_path):
    for name in ("a.pt", "b.pt", "c.pt"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def two_versions(**extra):
    return {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt", "weight": 90},
                                           "v2": {"checkpoint": "b.pt", "weight": 10}},
                              **extra}}}  # fmt: skip


def test_a_good_registry_in_yaml_and_json(ckpts):
    data = two_versions(breaker={"max_p95_ms": 500, "window": 20, "min_requests": 5})
    data["models"]["mt"]["versions"]["v3"] = {"checkpoint": "c.pt", "shadow": True,
                                              "shadow_fraction": 0.25, "engine": "onnx"}  # fmt: skip
    for name in ("models.yaml", "models.json"):
        spec = load_registry(write(ckpts, data, name))
        model = spec.models["mt"]
        assert [v.name for v in model.primaries] == ["v1", "v2"]
        assert [(v.name, v.shadow_fraction, v.engine) for v in model.shadows] == [
            ("v3", 0.25, "onnx")
        ]
        assert model.versions["v1"].checkpoint == str(ckpts / "a.pt")  # relative to the file
        assert model.versions["v1"].weight == 90 and model.versions["v3"].weight == 0
        assert model.breaker == BreakerConfig(window=20, min_requests=5, max_p95_ms=500)
        assert spec.share_dictionaries and spec.default_model is None


BAD = {
    "missing checkpoint file": (
        {"models": {"mt": {"versions": {"v1": {"checkpoint": "nope.pt"}}}}},
        "models.mt.versions.v1.checkpoint: {root}/nope.pt: no such checkpoint file or ONNX folder",
    ),
    "no checkpoint key": (
        {"models": {"mt": {"versions": {"v1": {"weight": 1}}}}},
        "models.mt.versions.v1: no checkpoint",
    ),
    "weights sum to zero": (
        {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt", "weight": 0}}}}},
        "models.mt.versions: the weights sum to 0: they must sum to a positive number",
    ),
    "negative weight": (
        {
            "models": {
                "mt": {
                    "versions": {
                        "v1": {"checkpoint": "a.pt", "weight": -1},
                        "v2": {"checkpoint": "b.pt", "weight": 5},
                    }
                }
            }
        },
        "models.mt.versions.v1.weight: must be >= 0, got -1",
    ),  # fmt: skip
    "weight not a number": (
        {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt", "weight": "ten"}}}}},
        "models.mt.versions.v1.weight: must be a number, got 'ten'",
    ),
    "unknown version key": (
        {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt", "wieght": 1}}}}},
        "models.mt.versions.v1: unknown key(s) ['wieght']",
    ),
    "unknown top key": ({"modles": {}}, "top level: unknown key(s) ['modles']"),
    "unknown breaker key": (
        two_versions(breaker={"error_rate": 0.5}),
        "models.mt.breaker: unknown key(s) ['error_rate']",
    ),
    "bad breaker value": (
        two_versions(breaker={"max_error_rate": 1.5}),
        "models.mt.breaker.max_error_rate: must be <= 1, got 1.5",
    ),
    "unknown engine": (
        {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt", "engine": "tf"}}}}},
        "models.mt.versions.v1.engine: unknown engine 'tf'; one of torch, onnx",
    ),
    "only shadows": (
        {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt", "shadow": True}}}}},
        "models.mt.versions: every version is a shadow",
    ),
    "shadow with a weight": (
        {
            "models": {
                "mt": {
                    "versions": {
                        "v1": {"checkpoint": "a.pt"},
                        "v2": {"checkpoint": "b.pt", "shadow": True, "weight": 3},
                    }
                }
            }
        },
        "models.mt.versions.v2.weight: a shadow version takes no weight",
    ),  # fmt: skip
    "no model": ({"models": {}}, "models: no model"),
    "no version": ({"models": {"mt": {"versions": {}}}}, "models.mt.versions: no version"),
    "unknown default model": (
        dict(two_versions(), default_model="cls"),
        "default_model: 'cls' is not a model of the registry (['mt'])",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_registry_names_the_file_and_the_entry(ckpts, case):
    data, message = BAD[case]
    path = write(ckpts, data)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert str(info.value).startswith(f"registry {path}: "), info.value
    assert message.format(root=ckpts) in str(info.value), info.value


def test_duplicate_versions_and_bad_files_are_refused(ckpts):
    yaml_text = ("models:\n  mt:\n    versions:\n      v1: {checkpoint: a.pt}\n"
                 "      v1: {checkpoint: b.pt}\n")  # fmt: skip
    with pytest.raises(RegistryError, match=r"duplicate key 'v1' \(line 5\)"):
        load_registry(write(ckpts, yaml_text))
    json_path = ckpts / "models.json"
    json_path.write_text('{"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt"}, '
                         '"v1": {"checkpoint": "b.pt"}}}}}')  # fmt: skip
    with pytest.raises(RegistryError, match="models.json: duplicate key 'v1'"):
        load_registry(json_path)
    json_path.write_text('{"models": ')
    with pytest.raises(RegistryError, match="not valid JSON"):
        load_registry(json_path)
    with pytest.raises(RegistryError, match="expected a .yaml, .yml or .json file"):
        load_registry(ckpts / "a.pt")
    with pytest.raises(RegistryError, match="no such file"):
        load_registry(ckpts / "missing.yaml")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(write(ckpts, "models: [unclosed"))


def test_stable_uniform_and_pick_by_cumulative_weights():
    assert traffic.stable_uniform("abc") == traffic.stable_uniform("abc")
    u = [traffic.stable_uniform(str(i)) for i in range(20000)]
    assert all(0 <= x < 1 for x in u)
    assert abs(sum(u) / len(u) - 0.5) < 0.01  # uniform: mean 1/2 (sd 0.002)
    weights = [("a", 90), ("b", 10)]
    assert traffic.pick(weights, 0.0) == "a" and traffic.pick(weights, 0.8999) == "a"
    assert traffic.pick(weights, 0.9) == "b" and traffic.pick(weights, 0.999999) == "b"
    assert traffic.pick([("a", 0), ("b", 3)], 0.1) == "b"  # a's share goes to b
    assert traffic.pick([("a", 0), ("b", 0)], 0.5) is None
    assert traffic.shares([("a", 3), ("b", 1), ("c", 0)]) == {"a": 0.75, "b": 0.25, "c": 0.0}


def test_the_split_is_sticky_and_weighted():
    weights = [("v1", 90), ("v2", 10)]
    n = 20000
    chosen = [traffic.pick(weights, traffic.draw("mt", traffic.sticky_id(f"r{i}", None)))
              for i in range(n)]  # fmt: skip
    share = chosen.count("v2") / n
    sigma = math.sqrt(0.1 * 0.9 / n)
    assert abs(share - 0.1) < 4.5 * sigma, share
    for i in range(50):  # the same id always gets the same version
        sticky = traffic.sticky_id(None, f"key-{i}")
        picks = {traffic.pick(weights, traffic.draw("mt", sticky)) for _ in range(20)}
        assert len(picks) == 1
    assert traffic.sticky_id("r", "k") == "id:r" and traffic.sticky_id(None, None) is None
    rng = random.Random(0)
    assert traffic.takes_shadow_copy("mt", "v3", 1.0, None)
    copies = sum(traffic.takes_shadow_copy("mt", "v3", 0.25, None, rng) for _ in range(4000))
    assert abs(copies / 4000 - 0.25) < 4.5 * math.sqrt(0.25 * 0.75 / 4000)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_breaker_trips_on_error_rate_then_half_opens_and_closes():
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(window=10, min_requests=4, max_error_rate=0.5,
                                     cooldown_s=30, probe_share=0.2, probe_requests=3), clock)  # fmt: skip
    assert b.state == CLOSED and b.weight_factor() == 1.0
    assert b.record(False, 0.01) is None  # 1 of 1 failed, but under min_requests
    assert b.record(True, 0.01) is None and b.record(False, 0.01) is None
    t = b.record(False, 0.01)  # 3 of 4 = 0.75 > 0.5
    assert (t.old, t.new) == (CLOSED, OPEN) and "error rate 0.75 (3 of the last 4" in t.reason
    assert b.state == OPEN and b.weight_factor() == 0.0 and b.trips == 1
    assert b.retry_after() == 30
    clock.now += 29.9
    assert b.state == OPEN and b.poll() is None
    clock.now += 0.1
    t = b.poll()
    assert (t.old, t.new) == (OPEN, HALF_OPEN) and b.weight_factor() == pytest.approx(0.2)
    assert b.record(True, 0.01) is None and b.record(True, 0.01) is None
    t = b.record(True, 0.01)
    assert (t.old, t.new) == (HALF_OPEN, CLOSED) and b.state == CLOSED
    assert b.stats()["requests"] == 0  # a fresh window
    # a failed probe opens it again
    for _ in range(4):
        b.record(False, 0.01)
    clock.now += 30
    assert b.state == HALF_OPEN
    t = b.record(False, 0.01)
    assert (t.old, t.new) == (HALF_OPEN, OPEN) and t.reason == "a probe request failed"
    assert b.trips == 3


def test_breaker_trips_on_p95_latency():
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(window=20, min_requests=10, max_p95_ms=100), clock)
    for _ in range(18):
        assert b.record(True, 0.050) is None
    t = b.record(True, 0.500)  # 19 requests: p95 (rank 19 of 19) = 500 ms
    assert t.new == OPEN and b.state == OPEN and "p95 latency 500 ms" in b.reason
    b2 = CircuitBreaker(BreakerConfig(window=20, min_requests=10, max_p95_ms=100), clock)
    for _ in range(19):
        b2.record(True, 0.050)
    assert b2.record(True, 0.500) is None and b2.state == CLOSED  # 20: p95 is rank 19 = 50 ms


# -- dictionaries and a deployment of fake engines -------------------------------------------


def test_equal_dictionaries_are_shared_by_content():
    import torch
    from fairseq.data import Dictionary

    from fairseq_moe_plugin.serve.dictionaries import DictionaryPool, content_hash

    def task_and_model(words):
        d1, d2 = Dictionary(), Dictionary()
        for w in words:
            d1.add_symbol(w)
            d2.add_symbol(w)
        task = type("Task", (), {})()
        task.src_dict, task.tgt_dict, task.dicts = d1, d2, {"en": d1, "de": d2}
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        model[0].dictionary = d2
        return task, model

    pool = DictionaryPool()
    t1, m1 = task_and_model(["a", "b"])
    assert content_hash(t1.src_dict) == content_hash(t1.tgt_dict)
    first = pool.share(t1, m1)
    assert first["dictionaries"] == 2 and first["shared"] == 1  # en and de are equal
    assert t1.src_dict is t1.tgt_dict is t1.dicts["de"] is m1[0].dictionary
    t2, m2 = task_and_model(["a", "b"])
    second = pool.share(t2, m2)
    assert second["shared"] == 2 and second["saved_bytes"] > 0
    assert t2.src_dict is t1.src_dict and m2[0].dictionary is t1.src_dict
    t3, m3 = task_and_model(["a", "c"])  # other content: its own
    assert pool.share(t3, m3)["shared"] == 1 and t3.src_dict is not t1.src_dict
    off = DictionaryPool(enabled=False)
    t4, m4 = task_and_model(["a", "b"])
    assert off.share(t4, m4)["shared"] == 0 and t4.src_dict is not t4.tgt_dict


class FakeRouting:
    num_experts, fallback_expert = {}, {}


class FakeEngine:
    """A classifier that answers its version's name (``fail``: raises)."""

    kind, route = "classification", "/v1/classify"
    labels = ["x"]

    def __init__(self, checkpoint, kind="classification"):
        from fairseq_moe_plugin.serve.engine_base import EngineOptions

        self.checkpoint, self.options, self.routing = checkpoint, EngineOptions(), FakeRouting()
        self.kind = kind
        self.route = "/v1/classify" if kind == "classification" else "/v1/translate"
        self.fail = False

    def encode(self, text, where):
        return [0] * len(text)

    def run(self, key, items):
        from fairseq_moe_plugin.serve.engine_base import BatchResult

        if self.fail:
            raise RuntimeError("broken")
        return BatchResult([self.checkpoint] * len(items), 0, [])

    def describe(self):
        return {"kind": self.kind}


def fake_load(checkpoint, options, dictionaries):
    if "translate" in checkpoint:
        return FakeEngine(checkpoint, "translation")
    return FakeEngine(checkpoint)


def deploy(path):
    from fairseq_moe_plugin.serve.deployment import Deployment
    from fairseq_moe_plugin.serve.engine_base import EngineOptions
    from fairseq_moe_plugin.serve.metrics import ServeMetrics
    from fairseq_moe_plugin.serve.settings import ServeSettings

    return Deployment.start(load_registry(path), EngineOptions(), ServeMetrics(),
                            ServeSettings(max_wait_ms=0), load=fake_load)  # fmt: skip


def test_deployment_routes_requests_and_refuses_unknown_names(ckpts):
    from fairseq_moe_plugin.serve.errors import ServeError

    (ckpts / "translate.pt").write_bytes(b"x")
    data = two_versions()
    data["models"]["mt2"] = {"versions": {"a": {"checkpoint": "translate.pt"}}}
    d = deploy(write(ckpts, data))
    try:
        assert d.routes() == {"mt": "/v1/classify", "mt2": "/v1/translate"}
        choice = d.resolve("/v1/classify", None, None, "id:r1")  # the only classifier
        assert choice.primary.spec.model == "mt" and choice.how == "split"
        choice.release()
        choice = d.resolve("/v1/classify", "mt", "v2", None)
        assert choice.primary.spec.name == "v2" and choice.how == "explicit"
        assert choice.primary.holders == 1
        choice.release()
        cases = [(("/v1/classify", "nope", None), 404, "unknown_model"),
                 (("/v1/classify", "mt", "v9"), 404, "unknown_version"),
                 (("/v1/classify", "mt2", None), 404, "route_not_served")]  # fmt: skip
        for args, status, kind in cases:
            with pytest.raises(ServeError) as info:
                d.resolve(*args, None)
            assert (info.value.status, info.value.kind) == (status, kind), info.value.message
        # both versions open: the model answers 503 naming it
        for rt in d.model_versions("mt"):
            for _ in range(rt.breaker.config.min_requests):
                d.record(rt, False, 0.01)
        with pytest.raises(ServeError, match="model 'mt' is unavailable") as info:
            d.resolve("/v1/classify", None, None, None)
        assert info.value.status == 503
        with pytest.raises(ServeError, match="circuit breaker is open") as info:
            d.resolve("/v1/classify", "mt", "v1", None)
        assert info.value.status == 503 and info.value.headers["Retry-After"] == "30"
    finally:
        asyncio.run(d.close())


def test_reload_keeps_unchanged_engines_and_refuses_a_bad_file(ckpts):
    path = write(ckpts, two_versions())
    d = deploy(path)

    async def scenario():
        v1, v2 = d.versions[("mt", "v1")], d.versions[("mt", "v2")]
        held = d.resolve("/v1/classify", "mt", "v2", None)  # a request in flight on v2
        data = {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt", "weight": 1},
                                               "v3": {"checkpoint": "c.pt", "weight": 3}}}}}  # fmt: skip
        write(ckpts, data)
        report = await d.reload()
        assert report == {"added": ["mt/v3"], "kept": ["mt/v1"], "removed": ["mt/v2"],
                          "replaced": []}  # fmt: skip
        assert d.versions[("mt", "v1")] is v1 and v1.spec.weight == 1  # same engine
        assert traffic.shares(d.weights("mt")) == {"v1": 0.25, "v3": 0.75}
        await asyncio.sleep(0.05)
        assert v2.draining and v2.batcher is not None and not v2.batcher._closing  # held
        assert await v2.batcher.submit("classify", [[0]]) == [str(ckpts / "b.pt")]
        held.release()
        await asyncio.sleep(0.1)
        assert v2.batcher._closing  # drained once released
        write(ckpts, {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt",
                                                            "weight": -2}}}}})  # fmt: skip
        with pytest.raises(ValueError, match="versions.v1.weight: must be >= 0"):
            await d.reload()
        assert sorted(d.versions) == [("mt", "v1"), ("mt", "v3")] and v1.spec.weight == 1
        (ckpts / "translate.pt").write_bytes(b"x")
        write(ckpts, {"models": {"mt": {"versions": {"v1": {"checkpoint": "a.pt"},
                                                     "t": {"checkpoint": "translate.pt"}}}}})  # fmt: skip
        with pytest.raises(ValueError, match="models.mt: its versions are of different kinds"):
            await d.reload()
        assert sorted(d.versions) == [("mt", "v1"), ("mt", "v3")]
        await d.close()

    asyncio.run(scenario())
