"""fairseq-moe-count-ops: outermost ATen ops, counted with torch's profiler."""

import json

import torch
import torch.nn.functional as F

from fairseq_moe_cli import count_ops


def test_only_outermost_aten_calls_count():
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    ops = count_ops.outermost_aten_ops(lambda: F.relu(F.linear(x, w)))
    assert dict(ops) == {"aten::linear": 1, "aten::relu": 1}  # not linear's inner addmm/t


def test_dense_ffn_counts_and_the_table(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert count_ops.main(["--experts", "4", "--tokens", "16", "--d-model", "16", "--d-ff", "32",
                           "--json", str(out)]) == 0  # fmt: skip
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["dense"]["forward"] == 3 and rows["dense"]["eval_forward"] == 3
    assert rows["ours/padded"]["forward"] is None and rows["ours/padded"]["eval_forward"] > 0
    for impl in ("ours/auto", "ours/loop", "ours/grouped_mm", "grouped_mm"):
        assert rows[impl]["forward_backward"] > rows[impl]["forward"] > 0, impl
    assert "| 4 | dense | 3 |" in capsys.readouterr().out


def test_bad_arguments_name_the_flag(capsys):
    for argv, message in ((["--top-k", "9", "--experts", "8"], "--top-k 9 must be between 1"),
                          (["--tokens", "0"], "--tokens must be >= 1")):  # fmt: skip
        try:
            count_ops.main(argv)
        except SystemExit as e:
            assert e.code == 2
        assert message in capsys.readouterr().err
