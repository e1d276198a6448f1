"""fairseq-moe-benchmark-generate (fairseq_moe_cli/benchmark_generate.py): its own --bench-*
options are split from fairseq-generate's arguments, which pass through unchanged and in order.
(The whole tool runs in the recipe test, tests/test_translation_recipe.py.)"""

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
