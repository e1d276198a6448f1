"""fairseq-moe-benchmark-logging: it times the routing metrics on real records, and counts them."""

import pytest

from fairseq_moe_cli.benchmark_logging import main, measure, parse_args


def test_it_measures_the_logged_values_of_real_records():
    args = parse_args("--layers 2 --experts 4 --topk 2 --tokens 64 --d-model 16 --d-ff 32 "
                      "--repeats 3".split())  # fmt: skip
    result = measure(args)
    # 8 totals, then per layer 7 statistics and one count per expert (moe_metrics.py).
    assert result["logged_values"] == 8 + 2 * (7 + 4)
    assert all(result[k] > 0 for k in ("per_batch_ms", "per_update_ms", "layers_fwd_bwd_ms"))


def test_cli_prints_the_figures(capsys):
    assert (
        main("--layers 1 --experts 2 --topk 1 --tokens 8 --d-model 8 --d-ff 8 --repeats 1".split())
        == 0
    )
    out = capsys.readouterr().out
    assert "per update (reduce_metrics)" in out and "values logged per batch:" in out


def test_bad_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--topk", "3", "--experts", "2"])
    assert "--topk 3 exceeds --experts 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--tokens", "0"])
    assert "--tokens must be >= 1, got 0" in capsys.readouterr().err
