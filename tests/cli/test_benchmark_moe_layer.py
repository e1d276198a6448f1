"""fairseq-moe-benchmark-layer (fairseq_moe_cli/benchmark_moe_layer.py) and its references
(fairseq_moe_cli/moe_layer_references.py): the references compute what the product layer
computes, and the dense limit does the experts' matmul FLOPs, so the benchmark compares like with
like; the einsum memory estimate is a lower bound of the measured peak, and the memory
measurement is exact on a known allocation pattern; each setting's process gets the allocator
set-up asked for; the targets apply where their setting matches, and pass or fail on their
bounds; the CLI writes its report."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from moe_factories import D_MODEL, make_layer, param_grads
from torch.utils.flop_counter import FlopCounterMode

from fairseq_moe_cli.benchmark_moe_layer import TUNED_MALLOC, main, malloc_environment
from fairseq_moe_cli.measure import peak_bytes
from fairseq_moe_cli.moe_layer_references import (
    DenseFFN,
    EinsumMoE,
    GroupedMMMoE,
    NaiveLoopMoE,
    einsum_peak_bytes_estimate,
    grouped_mm_function,
    grouped_mm_skip_reason,
)
from fairseq_moe_cli.moe_layer_report import summarise, target_checks


def _run(module, x, cotangent, product: bool):
    x = x.clone().requires_grad_(True)
    y = module(x)[0] if product else module(x)
    (y * cotangent).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("k, normalize", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("reference", ["naive_loop", "naive_loop_modules", "einsum"])
def test_references_equal_the_dropless_product_layer(reference, k, normalize):
    layer = make_layer(5, k, normalize_top_k=normalize, capacity_factor=0.0)
    x = torch.randn(23, D_MODEL, dtype=torch.float64)  # T x C
    cotangent = torch.randn_like(x)
    y, x_grad = _run(layer, x, cotangent, product=True)
    grads = param_grads(layer)
    ref = {
        "naive_loop": lambda: NaiveLoopMoE(layer),
        "naive_loop_modules": lambda: NaiveLoopMoE(layer, per_expert_modules=True),
        "einsum": lambda: EinsumMoE(layer, capacity_factor=0.0),  # capacity T: drops nothing
    }[reference]()
    y_ref, x_grad_ref = _run(ref, x, cotangent, product=False)
    torch.testing.assert_close(y_ref, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad_ref, x_grad, rtol=1e-5, atol=1e-6)
    ref_grads = param_grads(layer)  # the router (and stacked experts) are shared
    torch.testing.assert_close(
        ref_grads["gate.wg.weight"], grads["gate.wg.weight"], rtol=1e-5, atol=1e-6
    )
    if reference != "naive_loop_modules":
        for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            key = f"experts.{name}"
            torch.testing.assert_close(ref_grads[key], grads[key], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(grouped_mm_function() is None, reason="this torch has no grouped_mm")
@pytest.mark.parametrize("k, normalize", [(1, False), (2, True), (3, False)])
def test_grouped_mm_reference_equals_the_dropless_product_layer(k, normalize):
    # grouped_mm takes fp32 at most (no fp64) and rows in 16-byte multiples: C 8, F 16 fp32.
    layer = make_layer(6, k, normalize_top_k=normalize, capacity_factor=0.0, dtype=torch.float32)
    x = torch.randn(37, D_MODEL)  # T x C
    x[:, 0] = 10.0  # a constant feature that routes away from the last expert: it gets no rows
    with torch.no_grad():
        layer.gate.wg.weight[:, 0] = 1.0
        layer.gate.wg.weight[-1, 0] = -1.0
    cotangent = torch.randn_like(x)
    y, x_grad = _run(layer, x, cotangent, product=True)
    assert (layer.gate(x).expert_index != 5).all()
    grads = param_grads(layer)
    y_ref, x_grad_ref = _run(GroupedMMMoE(layer), x, cotangent, product=False)
    tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y_ref, y, **tol)
    torch.testing.assert_close(x_grad_ref, x_grad, **tol)
    ref_grads = param_grads(layer)  # the router and the stacked experts are shared
    for name in ("gate.wg.weight", "experts.fc1_weight", "experts.fc1_bias",
                 "experts.fc2_weight", "experts.fc2_bias"):  # fmt: skip
        torch.testing.assert_close(ref_grads[name], grads[name], **tol, msg=name)


def test_grouped_mm_skip_reasons(monkeypatch):
    if grouped_mm_function() is not None:
        assert grouped_mm_skip_reason(32, 64, torch.float32) is None
    reason = grouped_mm_skip_reason(30, 64, torch.float32)  # 120-byte rows
    assert "16 bytes; d_model 30 and d_ff 64 in float32" in reason
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert "has neither torch.nn.functional.grouped_mm nor torch._grouped_mm" in (
        grouped_mm_skip_reason(32, 64, torch.float32)
    )


def test_einsum_capacity_keeps_first_choices_in_token_order():
    layer = make_layer(3, 2, capacity_factor=0.0)
    x = torch.randn(12, D_MODEL, dtype=torch.float64)
    ref = EinsumMoE(layer, capacity_factor=0.5)  # C = ceil(0.5 * 2 * 12 / 3) = 4
    assert ref.capacity(12) == 4
    combine, dispatch = ref.combine_weights(x)  # T x E x C
    assert combine.shape == (12, 3, 4)
    gate = layer.gate(x)
    # Expected slots: first choices in token order, then second choices, 4 slots per expert.
    filled = [0, 0, 0]
    expected = torch.zeros(12, 3, 4, dtype=torch.float64)
    for j in range(2):
        for t in range(12):
            e = int(gate.expert_index[t, j])
            if filled[e] < 4:
                expected[t, e, filled[e]] = 1.0
                filled[e] += 1
    assert torch.equal(dispatch, expected)
    assert torch.equal(combine > 0, expected > 0)
    assert (dispatch.sum(dim=(0, 2)) <= 4).all()


def _matmul_flops(fn, backward: bool) -> int:
    """The matmul FLOPs torch counts while ``fn()`` runs (and its output's backward)."""
    with FlopCounterMode(display=False) as counter:
        y = fn()
        if backward:
            y.backward(torch.ones_like(y))
    return counter.get_total_flops()


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_dense_limit_does_the_matmul_flops_of_the_dropless_experts(k, backward):
    layer = make_layer(4, k, capacity_factor=0.0, d_model=16, d_ff=32)  # E = 4, fp64
    dense = DenseFFN(16, k * 32).double()  # hidden k * d_ff
    x = torch.randn(64, 16, dtype=torch.float64, requires_grad=backward)  # T x C
    moe = _matmul_flops(lambda: layer(x)[0], backward)
    router = _matmul_flops(lambda: layer.gate(x).expert_weight, backward)
    experts = moe - router  # grouped experts, hand-written backward included
    assert experts == _matmul_flops(lambda: dense(x), backward) > 0
    assert experts == 2 * 64 * k * 2 * 16 * 32 * (3 if backward else 1)  # T k (C F + F C) MACs


@pytest.mark.parametrize("tokens, experts, k, factor", [(512, 4, 1, 1.0), (768, 4, 2, 0.5)])
def test_einsum_estimate_is_a_close_lower_bound_of_the_measured_peak(tokens, experts, k, factor):
    layer = make_layer(experts, k, capacity_factor=0.0, d_model=8, d_ff=8, dtype=torch.float32)
    ref = EinsumMoE(layer, capacity_factor=factor)
    x = torch.randn(tokens, 8, requires_grad=True)  # T x C
    cotangent = torch.randn(tokens, 8)

    def step():  # the benchmark's fwd+bwd
        ref(x).backward(cotangent)
        for p in layer.parameters():
            p.grad = None
        x.grad = None

    step()  # the allocator's first touch is not the step's memory
    measured = peak_bytes(step, "cpu")
    estimate = einsum_peak_bytes_estimate(tokens, experts, k, factor, dtype_bytes=4)
    assert estimate <= measured <= 1.5 * estimate, (estimate, measured)


def test_peak_bytes_on_a_known_pattern():
    def pattern():
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(3_000_000, dtype=torch.uint8)  # 4 MB live
        del a
        c = torch.empty(500_000, dtype=torch.uint8)  # 3.5 MB live
        del b, c
        d = torch.empty(2_000_000, dtype=torch.uint8)  # 2 MB live
        return d

    assert peak_bytes(pattern, "cpu") == 4_000_000


def test_malloc_environment_replaces_the_callers_malloc_settings():
    environ = {"PATH": "/bin", "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1",
               "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.cpu.hwcaps=-AVX2"}  # fmt: skip
    default = malloc_environment("default", environ)
    assert default == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}
    assert malloc_environment("tuned", environ) == dict(default, **TUNED_MALLOC)
    only_malloc = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}
    assert malloc_environment("default", only_malloc) == {}
    assert int(TUNED_MALLOC["MALLOC_MMAP_THRESHOLD_"]) > 32 * 2**20  # above glibc's dynamic max


def test_cli_writes_report_and_checks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "3")  # the caller's own: not passed on
    out = tmp_path / "bench.json"
    argv = ["--tokens", "64", "--experts", "4", "--topk", "1", "2", "--d-model", "16"]
    argv += ["--d-ff", "32", "--warmup", "0", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0  # --malloc both by default
    assert os.environ["MALLOC_ARENA_MAX"] == "3" and "MALLOC_TRIM_THRESHOLD_" not in os.environ
    printed = capsys.readouterr().out
    assert "malloc: default (glibc's defaults), tuned (MALLOC_MMAP_THRESHOLD_=" in printed
    assert "| cpu | 64 | 4 | 1 | default |" in printed and "**fwd+bwd**" in printed
    assert "| cpu | 64 | 4 | 1 | tuned |" in printed and "| grouped_mm |" in printed
    report = json.loads(out.read_text())
    assert report["machine"]["torch_threads"] == 2
    for malloc, env in (("default", {}), ("tuned", TUNED_MALLOC)):
        rows = [r for r in report["rows"] if r["malloc"] == malloc]
        assert len({(r["k"], r["impl"], r.get("mode")) for r in rows}) == 2 * 13
        assert all(r["malloc_env"] == env for r in rows)  # as the setting's process saw it
        assert {r["heap_serves_large_blocks"] for r in rows} <= {None, malloc == "tuned"}
        assert all(r["minor_faults"] >= 0 for r in rows if "mode" in r)
    impls = {(r["impl"], r.get("mode")) for r in report["rows"]}
    for impl in ("moe", "dense", "grouped_mm", "naive_loop", "naive_loop_modules", "einsum"):
        assert (impl, "fwd") in impls and (impl, "fwd+bwd") in impls
    assert ("moe_fresh_grads", "fwd+bwd") in impls
    entry = next(
        s for s in report["summary"] if (s["mode"], s["k"], s["malloc"]) == ("fwd+bwd", 2, "tuned")
    )
    assert entry["dense_over_moe"] == pytest.approx(entry["ms"]["dense"] / entry["ms"]["moe"])
    ratio = entry["ms"]["grouped_mm"] / entry["ms"]["moe"]
    assert entry["grouped_mm_over_moe"] == pytest.approx(ratio)
    moe_row = next(
        r
        for r in report["rows"]
        if (r["impl"], r.get("mode"), r["k"], r["malloc"]) == ("moe", "fwd+bwd", 2, "tuned")
    )
    router_ms, experts_ms = moe_row["router_s"] * 1e3, moe_row["experts_s"] * 1e3
    assert entry["router_share"] == pytest.approx(router_ms / entry["ms"]["moe"])
    rest = 1 - (router_ms + experts_ms) / entry["ms"]["moe"]
    assert entry["dispatch_share"] == pytest.approx(max(0.0, rest))  # tiny sizes: noisy times
    assert entry["memory_budget_mib"] > 0 and entry["moe_peak_mib"] > 0
    assert report["targets"] == []  # only the issue's sizes are checked against its targets


def test_profile_says_where_the_time_goes(tmp_path, capfd):
    argv = ["--tokens", "64", "--experts", "4", "--topk", "2", "--d-model", "16", "--d-ff", "32"]
    argv += ["--impls", "moe", "dense", "--no-memory", "--malloc", "default", "--profile"]
    argv += ["--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    assert "profile of one moe fwd+bwd (self time, top ops):" in capfd.readouterr().out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    profiles = {}
    for impl in ("moe", "dense"):
        ops = next(r for r in rows if (r["impl"], r.get("mode")) == (impl, "fwd+bwd"))["profile"]
        assert 0 < len(ops) <= 8 and sum(op["share"] for op in ops) <= 1 + 1e-9
        assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True)
        profiles[impl] = {op["op"] for op in ops}
    assert profiles["dense"] & {"aten::mm", "aten::addmm"}  # its matmuls are among the top ops


def test_einsum_is_skipped_with_its_estimate(tmp_path, capfd):
    argv = ["--tokens", "64", "--experts", "4", "--topk", "1", "--d-model", "8", "--d-ff", "8"]
    argv += ["--impls", "moe", "einsum", "--memory-fraction", "0", "--no-memory"]
    argv += ["--malloc", "tuned"]
    argv += ["--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    printed = capfd.readouterr().out  # printed by the setting's own process, hence capfd
    assert "einsum               skipped: its T x E x C tensors need about" in printed


def _rows(tokens, experts, k, malloc, times):
    return [
        {"device": "cpu", "tokens": tokens, "experts": experts, "k": k, "malloc": malloc,
         "mode": "fwd+bwd", "impl": impl, "median_s": s}
        for impl, s in times.items()
    ]  # fmt: skip


ARGS = {"d_model": 512, "d_ff": 2048, "threads": 2}


def test_targets_are_checked_at_the_issue_sizes():
    times = {"moe": 1.0, "dense": 0.95, "grouped_mm": 1.2, "einsum": 3.5, "naive_loop": 1.5,
             "naive_loop_modules": 1.2}  # fmt: skip
    rows = _rows(32768, 64, 1, "tuned", times)
    rows += _rows(32768, 64, 1, "default", dict(times, dense=0.85, grouped_mm=0.9))
    args = type("Args", (), dict(ARGS))
    checks = {c["check"]: c for c in target_checks(summarise(rows), args)}
    where = "T=32768 E=64 k=1 malloc=tuned: "
    dense = checks[where + "throughput / dense (moe time <= 1.1 x dense) >= 0.909"]
    assert dense["ok"] and dense["value"] == pytest.approx(0.95)  # PASS: 1.0 <= 1.1 x 0.95
    assert checks[where + "speed-up over grouped_mm >= 1"]["ok"]  # 1.2
    assert checks[where + "speed-up over einsum >= 3"]["ok"]  # 3.5
    assert not checks[where + "speed-up over the naive loop (HF, stacked experts) >= 2"]["ok"]
    info = checks[where + "speed-up over the per-expert-module loop"]
    assert "ok" not in info and info["value"] == pytest.approx(1.2)
    where = "T=32768 E=64 k=1 malloc=default: "  # the same setting, the other malloc: its own
    dense = checks[where + "throughput / dense (moe time <= 1.1 x dense) >= 0.909"]
    assert not dense["ok"] and dense["value"] == pytest.approx(0.85)  # FAIL: 1.0 > 1.1 x 0.85
    assert not checks[where + "speed-up over grouped_mm >= 1"]["ok"]  # FAIL: 0.9, moe slower
    assert len(checks) == 2 * 5
    args.threads = 4  # the targets are defined at 2 threads only
    assert target_checks(summarise(rows), args) == []


def test_targets_apply_by_their_declared_setting():
    times = {"moe": 1.0, "dense": 0.92, "grouped_mm": 1.0}
    rows = [r for e in (8, 16, 64) for r in _rows(8192, e, 2, "default", times)]
    rows += _rows(8192, 32, 2, "default", times)  # an E the dense and grouped_mm ones skip
    rows += _rows(4096, 8, 2, "default", times)  # a T the targets are not defined at
    rows += _rows(8192, 8, 3, "default", times)  # a k the targets are not defined at
    rows += [dict(r, mode="fwd") for r in _rows(8192, 8, 2, "tuned", times)]  # not fwd+bwd
    args = type("Args", (), dict(ARGS))
    checks = target_checks(summarise(rows), args)
    assert sorted(c["check"].split(":")[0] for c in checks) == sorted(
        f"T=8192 E={e} k=2 malloc=default" for e in (8, 16, 64) for _ in range(2)
    )
    assert all(c["ok"] for c in checks)  # 0.92 >= 1/1.1; grouped_mm as fast as moe: not slower
    args.d_ff = 4096
    assert target_checks(summarise(rows), args) == []


def test_target_checks_are_printed_with_their_setting(tmp_path, capsys, monkeypatch):
    import fairseq_moe_cli.benchmark_moe_layer as bench

    def fake_run(args, device, tokens, experts, k, malloc):
        times = {"moe": 1.0, "dense": 0.8 if malloc == "default" else 0.95}
        return [dict(r, d_model=512, d_ff=2048) for r in _rows(tokens, experts, k, malloc, times)]

    monkeypatch.setattr(bench, "run_in_fresh_process", fake_run)
    argv = ["--tokens", "8192", "--experts", "16", "--topk", "2", "--impls", "moe", "dense"]
    assert main(argv + ["--json", str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    bound = "throughput / dense (moe time <= 1.1 x dense) >= 0.909"
    assert f"[FAIL] T=8192 E=16 k=2 malloc=default: {bound}: 0.80" in printed
    assert f"[PASS] T=8192 E=16 k=2 malloc=tuned: {bound}: 0.95" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--topk", "3", "--experts", "2"], "--topk 3 exceeds the smallest --experts value 2"),
        (["--tokens", "0"], "--tokens values must be >= 1"),
        (["--devices", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
