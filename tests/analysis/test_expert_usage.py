"""fairseq-moe-usage (fairseq_moe_cli/expert_usage.py) and its library
(fairseq_moe_plugin/analysis/): the training-time loads equal the recorded ones, figures are
written and their data matches the log, generation routing equals incremental decoding and
follows the generation flags, training logs without train_inner records skip their figures."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args

from fairseq_moe_cli import expert_usage
from fairseq_moe_plugin import naming
from fairseq_moe_plugin.analysis import routing_analysis as ra
from fairseq_moe_plugin.analysis import routing_log, training_log
from fairseq_moe_plugin.analysis import routing_plots as rp
from fairseq_moe_plugin.analysis.report import training_figures

MOE = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-capacity-factor", 1.0,
       "--criterion", "label_smoothed_cross_entropy_moe"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(toy_data, tmp_path_factory):
    torch.manual_seed(1)
    model, task, cfg = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    path = tmp_path_factory.mktemp("usage") / "checkpoint.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path


@pytest.fixture(scope="module")
def usage(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("usage_out")
    assert expert_usage.main(["--checkpoint", str(checkpoint), "--split", "valid", "--out",
                              str(out), "--max-sentences", "16"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, ra.load_log(out / "routing.npz")


def test_criterion_loads_equal_recorded_loads_on_the_same_batch(checkpoint, toy_data):
    from fairseq.logging.metrics import aggregate

    model, cfg, moe_layers = routing_log.load_checkpoint(checkpoint)
    pairs = routing_log.pair_tasks(cfg)
    log, _ = routing_log.record_split(model, moe_layers, pairs, "valid", 100000, 200)
    task = pairs[0][1]
    (sample,) = list(task.get_batch_iterator(
        dataset=task.dataset("valid"), max_tokens=100000, max_sentences=200,
        required_batch_size_multiple=1).next_epoch_itr(shuffle=False))  # fmt: skip
    criterion = task.build_criterion(cfg.criterion)
    with torch.no_grad():
        _, _, logging_output = criterion(model, sample)
    with aggregate(new_root=True) as agg:
        criterion.__class__.reduce_metrics([logging_output])
        logged = agg.get_smoothed_values()
    recorded = ra.layer_loads(log)
    assert len(recorded) == 4
    n_tokens = int(sample["net_input"]["src_tokens"].ne(task.source_dictionary.pad()).sum())
    assert int((log["layer"] == 0).sum()) == n_tokens
    for layer, data in recorded.items():
        for e, share in enumerate(data["shares"]):
            assert logged[naming.load_metric(layer, e)] == pytest.approx(share, abs=1e-4)
        assert logged[naming.layer_metric(layer, "entropy")] == pytest.approx(
            float(log["entropy"][log["layer"] == log["layer_names"].tolist().index(layer)].mean()),
            abs=1e-4,
        )


def test_files_are_written_and_figure_data_matches_the_log(usage):
    out, summary, log = usage
    assert summary["mode"] == "teacher_forced"
    for name, figure in summary["figures"].items():
        for key in ("png", "html"):
            if key in figure:
                assert (out / figure[key]).stat().st_size > 500, (name, key)
    names = log["layer_names"].tolist()
    # Recompute the heatmap's shares from the raw rows.
    values = summary["figures"]["layer_expert_share"]["data"]["values"]
    for i, row in enumerate(values):
        counts = np.bincount(log["experts"][log["layer"] == i].ravel(), minlength=4)
        np.testing.assert_allclose(row, counts / counts.sum())
        assert summary["layers"][names[i]]["counts"] == counts.tolist()
    # Entropy and Gini bars.
    bars = summary["figures"]["entropy_gini"]["data"]
    for i in range(len(names)):
        assert bars["token_entropy"][i] == pytest.approx(
            float(log["entropy"][log["layer"] == i].mean())
        )
        shares = np.sort(np.asarray(values[i]))
        gini = sum((2 * (j + 1) - 4 - 1) * s for j, s in enumerate(shares)) / 4
        assert bars["gini"][i] == pytest.approx(gini)
    # Capacity overflow at the checkpoint's factor 1.0, per batch.
    over = summary["figures"]["capacity_overflow"]["data"]["values"]
    rows = log["layer"] == 0
    expected = np.zeros(4)
    for b in np.unique(log["batch"][rows]):
        in_b = rows & (log["batch"] == b)
        counts = np.bincount(log["experts"][in_b].ravel(), minlength=4)
        expected += np.maximum(counts - math.ceil(1.0 * 2 * in_b.sum() / 4), 0)
    total = np.bincount(log["experts"][rows].ravel(), minlength=4)
    np.testing.assert_allclose(over[0], np.where(total > 0, expected / np.maximum(total, 1), 0))
    assert summary["capacity_factor"] == 1.0


def test_log_rows_are_the_real_tokens_and_positions(usage, toy_data):
    _, _, log = usage
    from fairseq.data import Dictionary

    vocab = Dictionary.load(str(toy_data["bin"] / "dict.src.txt"))
    src_lines = (toy_data["raw"] / "valid.src").read_text().splitlines()
    rows = (log["layer"] == 0) & (log["sentence"] == 3)
    order = np.argsort(log["position"][rows])
    words = [str(log["vocab"][t]) for t in log["token"][rows][order]]
    assert words == src_lines[3].split() + ["</s>"]
    assert log["position"][rows][order].tolist() == list(range(len(words)))
    assert vocab.index(words[0]) == log["token"][rows][order][0]
    assert set(log["lang"][rows].tolist()) == {log["langs"].tolist().index("src")}


def test_bilingual_model_has_no_language_figures_and_says_why(usage):
    _, summary, _ = usage
    assert not any("language" in name for name in summary["figures"])
    assert (
        summary["skipped"]["encoder_language_share"]
        == "the encoder sees one language and one direction"
    )
    assert "decoder_language_similarity" in summary["skipped"]


def test_per_language_shares_and_similarity_on_a_constructed_log():
    # Two languages: "de" tokens always go to expert 0, "fr" tokens half to 0, half to 1.
    log = {
        "layer": np.zeros(6, dtype=np.int16), "lang": np.array([0, 0, 1, 1, 1, 1]),
        "pair": np.array([0, 0, 1, 1, 1, 1]), "experts": np.array([[0], [0], [0], [1], [0], [1]]),
        "layer_names": np.array(["decoder.layers.1"]), "langs": np.array(["de", "fr"]),
        "pairs": np.array(["en-de", "en-fr"]), "num_experts": np.array(2),
    }  # fmt: skip
    data, skipped = ra.per_language(log)
    assert skipped == {}
    assert data["decoder"]["groups"] == ["de", "fr"]
    assert data["decoder"]["shares"]["decoder.layers.1"] == [[1.0, 0.0], [0.5, 0.5]]
    # JSD([1,0],[.5,.5]) = 0.5*(log2(1/.75)) + 0.5*(.5*log2(.5/.75) + .5*log2(.5/.25))
    jsd = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(2))
    np.testing.assert_allclose(data["decoder"]["similarity"], [[1, 1 - jsd], [1 - jsd, 1]])


def test_token_identity_share_hand_computed():
    tokens = np.array([7, 7, 7, 8, 8, 9])  # 9 occurs once: left out
    top1 = np.array([0, 0, 1, 1, 1, 0])
    s = ra.token_identity_share(tokens, top1)
    assert s["token_decided"] == pytest.approx(4 / 5)  # 7 -> 0 (2 of 3), 8 -> 1 (2 of 2)
    assert s["majority_expert_share"] == pytest.approx(3 / 5)


def test_generated_routing_equals_incremental_decoding(checkpoint):
    model, cfg, moe_layers = routing_log.load_checkpoint(checkpoint)
    ((_, task),) = routing_log.pair_tasks(cfg)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    decoder_layers = [m for m in moe_layers if naming.layer_side(m.name) == "decoder"]
    for index in (0, 5):
        sample = dataset.collater([dataset[index]])
        steps = {m.name: [] for m in decoder_layers}

        def keep(module, inputs, output, steps=steps):
            steps[module.name].append(output[1].expert_index.clone())

        hooks = [m.register_forward_hook(keep) for m in decoder_layers]
        generation = routing_log.generation_options(beam=1, max_len_b=8)
        prev, hyps = routing_log.generated_decoder_input(model, task, sample, generation)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            _, extra = model(
                sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], prev
            )
        for record in extra["moe_records"]:
            if naming.layer_side(record.layer) == "decoder":
                incremental = torch.cat(steps[record.layer])  # one row per step
                assert torch.equal(record.expert_index, incremental), record.layer
        assert prev.shape[1] == len(hyps[0])


def test_training_log_series_and_plots(tmp_path):
    lines = []
    for u in (10, 20):
        rec = {"epoch": 1, "num_updates": u, "moe_balance_loss": 1.0 + u / 100,
               "moe_entropy": 1.2, "moe_enc1_load_e0": 0.7, "moe_enc1_load_e1": 0.3}  # fmt: skip
        lines.append(f"2026-11-22 10:00:00 | INFO | train_inner | {json.dumps(rec)}")
    lines.append('2026-11-22 10:00:01 | INFO | valid | {"num_updates": 20}')
    path = tmp_path / "train.log"
    path.write_text("\n".join(lines))
    series = training_log.training_series(training_log.read_training_log(path).train_inner)
    assert series["updates"] == [10.0, 20.0]
    assert series["loads"] == {"enc1": [[0.7, 0.7], [0.3, 0.3]]}
    assert series["balance_loss"] == [1.1, 1.2]
    figures, skipped = rp.draw_training(series, tmp_path)
    assert skipped == {}
    assert (tmp_path / figures["train_expert_load"]["png"]).stat().st_size > 1000
    simple = tmp_path / "simple.log"
    simple.write_text(
        "| INFO | train_inner | epoch 001:  10 / 50 loss=3.2, moe_enc1_load_e0=0.5, num_updates=10\n"
    )
    assert training_log.read_training_log(simple).train_inner == [
        {"loss": 3.2, "moe_enc1_load_e0": 0.5, "num_updates": 10.0}
    ]


def test_bad_inputs_name_the_problem(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        routing_log.load_checkpoint(tmp_path / "missing.pt")
    bad_log = tmp_path / "empty.log"
    bad_log.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no train_inner records"):
        training_log.read_training_log(bad_log)
    np.savez(tmp_path / "x.npz", layer=np.zeros(2))
    with pytest.raises(ValueError, match="missing arrays"):
        ra.load_log(tmp_path / "x.npz")
    with pytest.raises(SystemExit):
        expert_usage.main(["--out", str(tmp_path)])  # neither checkpoint nor log
    assert (
        expert_usage.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
        == 2
    )


def test_generation_flags_default_to_fairseq_generate_and_reach_the_generator(checkpoint, tmp_path):
    args = expert_usage.build_parser().parse_args(["--out", str(tmp_path)])
    assert (args.beam, args.max_len_a, args.max_len_b, args.min_len) == (5, 0, 200, 1)
    assert (args.lenpen, args.unkpen) == (1, 0)
    # min_len = max_len = 3: every hypothesis is exactly three tokens (and EOS), whatever the
    # (untrained) model prefers.
    out = tmp_path / "gen"
    argv = ["--checkpoint", str(checkpoint), "--split", "valid", "--out", str(out),
            "--max-sentences", "8", "--generate", "--beam", "2", "--min-len", "3",
            "--max-len-a", "0", "--max-len-b", "3"]  # fmt: skip
    assert expert_usage.main(argv) == 0
    hypotheses = json.loads((out / "hypotheses.json").read_text())
    assert len(hypotheses) == 100  # every valid sentence
    assert {len(text.split()) for text in hypotheses.values()} == {3}
    log = ra.load_log(out / "routing.npz")
    decoder = np.isin(log["layer"], [i for i, n in enumerate(log["layer_names"].tolist())
                                     if naming.layer_side(n) == "decoder"])  # fmt: skip
    assert set(log["position"][decoder].tolist()) == {0, 1, 2, 3}  # first token + 3


def _epoch_lines():
    """What a run shorter than one --log-interval logs: epoch stats, no train_inner line."""
    train = {"epoch": 1, "train_loss": 9.1, "train_wps": 1500.0, "train_num_updates": 22}
    valid = {"epoch": 1, "valid_loss": 8.7, "valid_moe_enc1_load_e0": 0.6,
             "valid_num_updates": 22}  # fmt: skip
    return [
        "2026-11-22 10:00:00 | INFO | fairseq_cli.train | training on 1 devices (GPUs/TPUs)",
        f"2026-11-22 10:00:01 | INFO | valid | {json.dumps(valid)}",
        f"2026-11-22 10:00:01 | INFO | train | {json.dumps(train)}",
    ]


def test_training_log_reads_epoch_records_of_both_formats(tmp_path):
    path = tmp_path / "train.log"
    path.write_text("\n".join(_epoch_lines()) + "\n")
    log = training_log.read_training_log(path)
    assert log.train_inner == []
    assert log.valid == [{"epoch": 1.0, "loss": 8.7, "moe_enc1_load_e0": 0.6, "num_updates": 22.0}]
    assert log.train[0]["wps"] == 1500.0 and log.num_updates() == 22
    simple = tmp_path / "simple.log"
    simple.write_text(
        "2026-11-22 10:00:01 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.7 | "
        "moe_enc1_load_e0 0.6 | num_updates 22\n"
    )
    assert training_log.read_training_log(simple).valid == log.valid


def test_a_log_without_train_inner_records_skips_the_training_figures(tmp_path):
    path = tmp_path / "train.log"
    path.write_text("\n".join(_epoch_lines()) + "\n")
    figures, skipped = training_figures(path, tmp_path)
    assert figures == {}
    assert set(skipped) == {"train_expert_load", "train_balance_entropy"}
    assert "no train_inner records" in skipped["train_expert_load"]
    assert "update 22" in skipped["train_expert_load"]
    out = tmp_path / "usage"
    assert expert_usage.main(["--train-log", str(path), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["figures"] == {} and summary["skipped"] == skipped


# -- expert choice (encoder) with top-k in the decoder, and a shared expert ---------------------

EC = ["--encoder-moe-freq", 1, "--decoder-moe-freq", 1, "--moe-routing", "expert_choice",
      "--moe-decoder-routing", "topk", "--moe-expert-capacity-factor", 1.5,
      "--moe-shared-experts", 1, "--moe-shared-expert-gate",
      "--criterion", "label_smoothed_cross_entropy_moe"]  # fmt: skip


@pytest.fixture(scope="module")
def ec_usage(toy_data, tmp_path_factory):
    torch.manual_seed(1)
    model, task, cfg = build_model_and_task(tiny_args(toy_data["bin"], *EC))
    path = tmp_path_factory.mktemp("ec") / "checkpoint.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    out = tmp_path_factory.mktemp("ec_out")
    argv = ["--checkpoint", str(path), "--split", "valid", "--out", str(out),
            "--max-sentences", "16", "--generate", "--beam", "2", "--max-len-b", "6"]  # fmt: skip
    return argv, out


def test_expert_choice_log_lists_the_experts_that_took_each_token(ec_usage, capsys):
    """What run.py's routing step runs (beam search) on an expert-choice encoder, top-k decoder
    and a gated shared expert."""
    argv, out = ec_usage
    assert expert_usage.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    log = ra.load_log(out / "routing.npz")
    names = log["layer_names"].tolist()
    kinds = summary["layer_routing"]
    assert kinds == {n: "expert_choice" if naming.layer_side(n) == "encoder" else "topk"
                     for n in names}  # fmt: skip
    E = int(log["num_experts"])
    assert log["experts"].shape[1] == E  # as wide as an expert-choice token can be
    for i, name in enumerate(names):
        rows = log["layer"] == i
        taken = log["experts"][rows] >= 0  # R x E
        if kinds[name] == "topk":  # k experts, then the padding
            assert (taken.sum(axis=1) == int(log["k"])).all() and not taken[:, 2:].any()
            continue
        # Each expert takes exactly C = ceil(1.5 * N / E) of the N tokens of each batch.
        for b in np.unique(log["batch"][rows]):
            in_b = rows & (log["batch"] == b)
            counts = np.bincount(log["experts"][in_b][log["experts"][in_b] >= 0], minlength=E)
            assert counts.tolist() == [math.ceil(1.5 * int(in_b.sum()) / E)] * E, (name, b)
        per_token = taken.sum(axis=1)
        stats = summary["expert_choice"][name]
        assert stats["unchosen_share"] == pytest.approx(float((per_token == 0).mean()))
        assert stats["experts_per_token"] == pytest.approx(float(per_token.mean()))
        assert summary["layers"][name]["unchosen_share"] == stats["unchosen_share"]
        assert summary["layers"][name]["overflow"] == [0] * E  # experts take their capacity
        # best first: the weights of the taken slots do not increase along a row
        w = log["weights"][rows]
        assert (np.diff(np.where(taken, w, -1.0), axis=1) <= 0).all()
        assert (w[~taken] == 0).all()
    assert summary["figures"]["expert_choice"]["data"]["labels"] == [
        n for n in names if kinds[n] == "expert_choice"
    ]
    # The notes: expert choice depends on the batch; the shared expert is not routed.
    batch_note, shared_note = summary["notes"]
    assert "depends on the batch" in batch_note and "--max-sentences 16" in batch_note
    assert "ceil(1.5 * N / E)" in batch_note
    assert "1 shared expert(s)" in shared_note and "sigmoid gate" in shared_note
    assert f"expert_usage: note: {batch_note}" in printed


def test_chosen_experts_of_a_constructed_expert_choice_record():
    from types import SimpleNamespace

    keep = torch.tensor([[True, False, True], [False, False, False], [True, True, False]])
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.6, 0.3]])
    record = SimpleNamespace(expert_choice=True, keep=keep, expert_weight=probs * keep,
                             expert_index=torch.arange(3).expand(3, -1))  # fmt: skip
    experts, weights = routing_log.chosen_experts(record)
    assert experts.tolist() == [[2, 0, -1], [-1, -1, -1], [1, 0, -1]]
    np.testing.assert_allclose(weights, [[0.3, 0.2, 0], [0, 0, 0], [0.6, 0.1, 0]])
    # The analysis skips the empty slots: counts, and top-1 only for tokens some expert took.
    log = {"experts": experts, "num_experts": np.array(3)}
    assert ra.expert_counts(log).tolist() == [2, 1, 1]
