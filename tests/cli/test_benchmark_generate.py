"""fairseq-moe-benchmark-generate (fairseq_moe_cli/benchmark_generate.py): its own --bench-*
options are split from fairseq-generate's arguments, which pass through unchanged and in order.
(The whole tool runs in the recipe test, tests/examples/test_translation_recipe.py.)"""

import pytest

from fairseq_moe_cli.benchmark_generate import split_arguments


def test_bench_options_are_split_from_fairseq_generate_arguments():
    argv = ["data-bin", "--path", "x.pt", "--bench-batch-sizes", "1,4", "--beam", "5",
            "--bench-json=out.json", "--source-lang", "en"]  # fmt: skip
    bench, rest = split_arguments(argv)
    assert bench.bench_batch_sizes == [1, 4] and bench.bench_json == "out.json"
    assert bench.bench_max_sentences == 0  # the default: every sentence
    assert rest == ["data-bin", "--path", "x.pt", "--beam", "5", "--source-lang", "en"]
    _, rest = split_arguments(["data-bin", "--bench", "3"])  # no abbreviation of --bench-*
    assert rest == ["data-bin", "--bench", "3"]


@pytest.mark.parametrize(
    "value, message", [("0,2", "batch sizes must be >= 1"), ("1,x", "not a comma-separated")]
)
def test_bad_batch_sizes_name_the_option(value, message, capsys):
    with pytest.raises(SystemExit):
        split_arguments(["data-bin", "--bench-batch-sizes", value])
    err = capsys.readouterr().err
    assert "--bench-batch-sizes" in err and message in err


def test_profile_generation_names_the_ops_that_take_the_time():
    """On a stand-in task whose 'generation' is one matmul per sentence."""
    from types import SimpleNamespace

    import torch

    from fairseq_moe_cli.benchmark_generate import profile_generation, split_arguments

    weight = torch.randn(64, 64)

    def inference_step(generator, models, sample):
        return [[{"tokens": torch.mm(row.view(1, -1), weight).argmax(1)}] for row in sample]

    class Data(list):
        def collater(self, rows):
            return torch.stack(rows)  # batch x 64

    data = Data(torch.randn(64) for _ in range(6))
    task = SimpleNamespace(inference_step=inference_step)
    ops = profile_generation(task, None, [], data, list(range(6)), 2, "cpu", top=5)
    assert 0 < len(ops) <= 5 and "aten::mm" in {op["op"] for op in ops}
    assert [op["ms"] for op in ops] == sorted((op["ms"] for op in ops), reverse=True)
    assert split_arguments(["d", "--bench-profile"])[0].bench_profile


# The comparison with a baseline (--bench-baseline, --bench-rounds, the roofline columns), on two
# untrained tiny checkpoints of the toy corpus: conftest's dense_checkpoint (transformer_tiny,
# FFN 128) and an MoE checkpoint of 4 experts of FFN 128, top-1 (FLOP-matched).


@pytest.fixture(scope="module")
def moe_checkpoint(toy_data, tmp_path_factory):
    import torch
    from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args

    torch.manual_seed(5)
    args = tiny_args(toy_data["bin"], "--moe-expert-count", 4, "--moe-top-k", 1)
    model, _, cfg = build_model_and_task(args)
    path = tmp_path_factory.mktemp("moe") / "moe.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path


def generate_args(toy_data, path, *bench):
    from conftest import PLUGIN_DIR

    return [str(toy_data["bin"]), "--user-dir", str(PLUGIN_DIR), "--path", str(path),
            "--source-lang", "src", "--target-lang", "tgt", "--gen-subset", "valid",
            "--beam", "2", "--max-len-a", "0", "--max-len-b", "5", "--cpu",
            "--bench-threads", "1", *map(str, bench)]  # fmt: skip


@pytest.fixture
def keep_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_comparison_with_a_baseline_reports_medians_of_rounds_and_the_roofline(
    toy_data, moe_checkpoint, dense_checkpoint, tmp_path, capsys, keep_torch_threads
):
    import json
    import statistics

    from fairseq_moe_cli.benchmark_generate import main

    out = tmp_path / "bench.json"
    argv = generate_args(toy_data, moe_checkpoint, "--bench-baseline", dense_checkpoint[0],
                         "--bench-rounds", 2, "--bench-batch-sizes", "1,3",
                         "--bench-max-sentences", 6, "--bench-json", out,
                         "--bench-bandwidth-gbs", 20, "--bench-peak-gflops", 100)  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| batch | tok/s main | tok/s baseline | ratio main/baseline |" in printed
    results = json.loads(out.read_text())
    assert [r["batch_size"] for r in results["runs"]] == [1, 3]  # main's table, as before
    comparison = results["comparison"]
    assert comparison["rounds"] == 2 and comparison["machine"]["bandwidth_source"] == "given"
    rounds = comparison["per_round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(len(r["main"]) == len(r["baseline"]) == 2 for r in rounds)
    for i, entry in enumerate(comparison["batch_sizes"]):
        medians = {label: statistics.median(r[label][i]["tokens_per_s"] for r in rounds)
                   for label in ("main", "baseline")}  # fmt: skip
        assert entry["main"]["tokens_per_s"] == medians["main"]
        assert entry["ratio"] == pytest.approx(medians["main"] / medians["baseline"])
        main_rf, base_rf = entry["main"]["roofline"], entry["baseline"]["roofline"]
        assert entry["roofline_ratio"] == pytest.approx(base_rf["limit_ms"] / main_rf["limit_ms"])
        shape = main_rf["models"][0]["shape"]
        hits = shape["experts_hit"]  # the MoE decoder layer, measured in the untimed pass
        assert "decoder.layers.1.moe" in hits and 1 <= hits["decoder.layers.1.moe"] <= 4
        assert base_rf["models"][0]["shape"]["experts_hit"] == {}  # dense: no MoE layer
        assert 0 < shape["rows"] <= entry["batch_size"] * 2  # beam 2
        steps = entry["main"]["steps"]
        assert 1 <= steps <= 6 * 6  # at most max-len-b + 1 per sentence
        step_ms = statistics.median(r["main"][i]["total_ms"] / steps for r in rounds)
        assert entry["main"]["step_ms"] == pytest.approx(step_ms)


def test_a_missing_baseline_is_named(toy_data, moe_checkpoint, tmp_path, keep_torch_threads):
    from fairseq_moe_cli.benchmark_generate import main

    missing = tmp_path / "dense.pt"
    with pytest.raises(SystemExit) as err:
        main(generate_args(toy_data, moe_checkpoint, "--bench-baseline", missing))
    assert "--bench-baseline" in str(err.value) and str(missing) in str(err.value)


@pytest.mark.parametrize(
    "option, value, message",
    [("--bench-rounds", "0", "must be >= 1"), ("--bench-rounds", "x", "not an integer"),
     ("--bench-peak-gflops", "0", "must be > 0"), ("--bench-bandwidth-gbs", "-1", "must be > 0")],
)  # fmt: skip
def test_bad_rounds_and_machine_figures_are_refused(option, value, message, capsys):
    with pytest.raises(SystemExit):
        split_arguments(["data-bin", option, value])
    err = capsys.readouterr().err
    assert option in err and message in err
    bench, _ = split_arguments(["data-bin"])
    assert bench.bench_rounds == 1 and bench.bench_baseline is None
