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
