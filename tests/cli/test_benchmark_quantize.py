"""fairseq-moe-benchmark-quantize on tiny checkpoints quantised by fairseq-moe-quantize: a
sentence_prediction moe_roberta and a translation_multi_simple_epoch moe_transformer (whose
int8 checkpoint fairseq-generate decodes), and its errors."""

import json

import pytest
import torch
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args
from roberta_helpers import roberta_args

from fairseq_moe_cli.benchmark_quantize import BenchmarkError, main, parse_checkpoints
from fairseq_moe_cli.quantize import quantize_checkpoint

MODES = ("off", "dynamic", "weight_only")
FAST = ["--batch-sizes", "1,4", "--latency-batches", "2", "--repeats", "2", "--warmup", "1"]


def _binarise(lines, dictionary, prefix):
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(f"{prefix}.bin", "mmap", len(dictionary))
    for line in lines:
        builder.add_item(dictionary.encode_line(line, add_if_not_exist=False))
    builder.finalize(f"{prefix}.idx")


def _classification_data(root, n_test=40):
    """A sentence_prediction data-bin (input0/, label/) with an ``n_test``-sentence test split; returns
    (folder, test labels)."""
    from fairseq.data import Dictionary

    g = torch.Generator().manual_seed(0)
    words, labels = Dictionary(), Dictionary()
    for i in range(30):
        words.add_symbol(f"w{i}")
    for label in ("a", "b", "c"):
        labels.add_symbol(label)
    text = [" ".join(f"w{int(i)}" for i in torch.randint(0, 30, (int(k),), generator=g))
            for k in torch.randint(3, 12, (n_test,), generator=g)]  # fmt: skip
    gold = ["abc"[int(i)] for i in torch.randint(0, 3, (n_test,), generator=g)]
    for sub, d, lines in (("input0", words, text), ("label", labels, gold)):
        (root / sub).mkdir(parents=True)
        d.save(str(root / sub / "dict.txt"))
        _binarise(lines, d, root / sub / "test")
    return root, gold


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny MoE classifier's fp32 checkpoint and its three inference checkpoints."""
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    root = tmp_path_factory.mktemp("cls")
    data, gold = _classification_data(root / "data")
    args = roberta_args("--encoder-moe-freq", 1, "--moe-expert-count", 4, "--moe-top-k", 2)
    args.data = str(data)
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(2)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)  # registers the classification head
    save_trainer_style_checkpoint(model, cfg, root / "trained.pt")
    paths = {m: root / f"{m}.pt" for m in MODES}
    for mode, path in paths.items():
        quantize_checkpoint(root / "trained.pt", path, mode)
    return paths, data, gold, model.eval()


@pytest.fixture(scope="module")
def translator(toy_data, tmp_path_factory):
    """A tiny MoE translator (translation_multi_simple_epoch, language tokens) quantised."""
    root = tmp_path_factory.mktemp("tr")
    torch.manual_seed(5)
    model, _, cfg = build_model_and_task(tiny_args(
        toy_data["bin"], "--task", "translation_multi_simple_epoch", "--lang-pairs", "src-tgt",
        "--langs", "src,tgt", "--encoder-langtok", "tgt", "--decoder-langtok",
        "--moe-expert-count", 4, "--moe-top-k", 2))  # fmt: skip
    save_trainer_style_checkpoint(model, cfg, root / "trained.pt")
    paths = {m: root / f"{m}.pt" for m in ("off", "dynamic")}
    for mode, path in paths.items():
        quantize_checkpoint(root / "trained.pt", path, mode)
    return paths


def _check_latency(entry, tokens: bool, sizes=("1", "4"), timed=4):
    """Every batch size timed on 2 batches x 2 repeats; beam search counts its output."""
    assert list(entry["latency"]) == list(sizes)
    for stats in entry["latency"].values():
        assert 0 < stats["p50_ms"] <= stats["p95_ms"] and stats["timed_batches"] == timed
        assert (stats.get("output_tokens_per_pass", 0) > 0) == tokens


def test_classification_report_every_checkpoint(classifier, tmp_path):
    paths, data, gold, fp32_model = classifier
    out = tmp_path / "out"
    argv = [f"--checkpoint={m}={p}" for m, p in paths.items()]
    assert main([*argv, "--out-dir", str(out), "--threads", "1", *FAST]) == 0
    report = json.loads((out / "quant_bench.json").read_text())
    assert report["kind"] == "classification" and list(report["checkpoints"]) == list(MODES)
    rows = report["checkpoints"]
    assert [rows[m]["int8"] for m in MODES] == list(MODES)
    assert rows["dynamic"]["size_mib"] < 0.8 * rows["off"]["size_mib"]
    # the same int8 tensors: only the saved mode's name differs
    assert rows["weight_only"]["size_mib"] == pytest.approx(rows["dynamic"]["size_mib"], abs=1e-3)
    # the fp32 accuracy is the head's arg-max against the gold labels, sentence by sentence
    from fairseq_moe_plugin.checkpoint_io import load_model_ensemble_and_task

    _, _, task = load_model_ensemble_and_task(paths["off"])
    task.load_dataset("test")
    ds = task.dataset("test")
    with torch.no_grad():
        batch = ds.collater([ds[i] for i in range(len(ds))])
        logits = fp32_model(**batch["net_input"], features_only=True,
                            classification_head_name="sentence_classification_head")[0]  # fmt: skip
    d = task.label_dictionary
    ids, best = batch["id"].tolist(), logits.argmax(-1).tolist()
    pred = {i: d[p + d.nspecial] for i, p in zip(ids, best, strict=True)}
    expected = sum(pred[i] == g for i, g in enumerate(gold)) / len(gold)
    assert rows["off"]["quality"]["accuracy"] == pytest.approx(expected)
    for m in MODES:
        q = rows[m]["quality"]
        assert q["n"] == len(gold) and 0 <= q["macro_f1"] <= 1, m
        assert sorted(q["f1_per_label"]) == ["a", "b", "c"]
        _check_latency(rows[m], tokens=False)
    table = (out / "quant_bench.md").read_text().splitlines()
    assert table[0].startswith("| checkpoint | int8 | size MiB | accuracy | macro-F1 | b1 p50 ms")
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {m}" for m in MODES]


def test_translation_report_decodes_int8_with_fairseq_generate(translator, toy_data, tmp_path):
    out = tmp_path / "out"
    argv = [f"--checkpoint=fp32={translator['off']}", f"--checkpoint=int8={translator['dynamic']}",
            "--out-dir", str(out), "--max-sentences", "6", "--beam", "2", "--max-len-b", "4",
            "--post-process", "none", "--tokenize", "13a", *FAST]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "quant_bench.json").read_text())
    assert report["kind"] == "translation" and report["task"] == "translation_multi_simple_epoch"
    rows = report["checkpoints"]
    assert rows["int8"]["int8"] == "dynamic" and rows["int8"]["size_mib"] < rows["fp32"]["size_mib"]
    for name, row in rows.items():
        q = row["quality"]
        assert list(q["languages"]) == ["tgt"] and q["latency_pair"] == "src-tgt", name
        r = q["languages"]["tgt"]
        assert r["sentences"] == 6 and 0 <= r["bleu"] <= 100 and 0 <= r["chrf"] <= 100, name
        gen = (out / "generate" / f"{name}.src-tgt.txt").read_text()
        assert gen.count("\nD-") == 6 and "--user-dir" in gen.splitlines()[0], name
        _check_latency(row, tokens=True)
    # the scored test split is the first 6 sentences of the real one
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    for lang in ("src", "tgt"):
        cut = MMapIndexedDataset(str(out / "data-bin.test6" / f"test.src-tgt.{lang}"))
        full = MMapIndexedDataset(str(toy_data["bin"] / f"test.src-tgt.{lang}"))
        assert len(cut) == 6 and all(torch.equal(cut[i], full[i]) for i in range(6))
    table = (out / "quant_bench.md").read_text()
    assert "| BLEU tgt | chrF tgt | BLEU avg | chrF avg | b1 p50 ms" in table


def test_bad_checkpoint_specs_are_named(tmp_path, classifier, translator, capsys):
    real = tmp_path / "real.pt"
    real.write_bytes(b"x")
    for spec, message in (("nameless.pt", "expected NAME=PATH"), ("=a.pt", "expected NAME=PATH"),
                          ("a=", "expected NAME=PATH"),
                          (f"x={tmp_path / 'missing.pt'}", "x: no checkpoint file")):  # fmt: skip
        with pytest.raises(BenchmarkError, match=message):
            parse_checkpoints([spec])
    with pytest.raises(BenchmarkError, match="'a' is used twice"):
        parse_checkpoints([f"a={real}", f"a={real}"])
    out = str(tmp_path / "out")
    assert main(["--checkpoint", f"x={tmp_path / 'missing.pt'}", "--out-dir", out]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert main(["--checkpoint", f"junk={real}", "--out-dir", out]) == 2
    assert f"cannot read {real} as a fairseq checkpoint" in capsys.readouterr().err
    mixed = [f"--checkpoint=c={classifier[0]['off']}", f"--checkpoint=t={translator['off']}"]
    assert main([*mixed, "--out-dir", out]) == 2
    assert "mix translation and classification" in capsys.readouterr().err
