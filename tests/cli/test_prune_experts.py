"""fairseq-moe-prune-experts (fairseq_moe_cli/prune_experts.py): the recorded routing chooses
the experts counted by hand, the pruned checkpoints hold the kept router rows and load in
checkpoint_io, the hub, fairseq-moe-quantize, ONNX export, the server's load_engine and
fairseq-generate; per-language outputs of a multilingual model; every bad input's error."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    BIN,
    PLUGIN_DIR,
    build_model_and_task,
    run_cli,
    save_trainer_style_checkpoint,
    tiny_args,
    toy_batch,
)

from fairseq_moe_cli.prune_experts import main
from fairseq_moe_plugin.analysis.routing_analysis import load_log
from fairseq_moe_plugin.checkpoint_io import load_model_ensemble_and_task, read_checkpoint_state

MOE = ["--moe-expert-count", 4, "--moe-top-k", 2, "--moe-usage-ema", 0.9]
ROUTER = "encoder.layers.1.moe.gate.wg.weight"


@pytest.fixture(scope="module")
def source(toy_data, tmp_path_factory):
    torch.manual_seed(7)
    model, task, cfg = build_model_and_task(tiny_args(toy_data["bin"], *MOE))
    path = tmp_path_factory.mktemp("prune") / "moe.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path, model.eval(), task


@pytest.fixture(scope="module")
def pruned(source, toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    argv = [str(source[0]), "--data", str(toy_data["bin"]), "--subset", "valid", "--keep", "2",
            "3", "--criterion", "weighted-load", "--fallback-expert", "0", "--out", str(out),
            "--max-sentences", "16"]  # fmt: skip
    assert main(argv) == 0
    return out, json.loads((out / "prune.json").read_text())


def test_outputs_keep_the_experts_counted_by_hand_and_their_router_rows(source, pruned):
    out, manifest = pruned
    log = load_log(out / "routing.npz")
    names = log["layer_names"].tolist()
    assert [o["keep"] for o in manifest["outputs"]] == [2, 3]
    assert manifest["criterion"] == "weighted-load" and manifest["subset"] == "valid"
    original = source[1].state_dict()
    for output in manifest["outputs"]:
        state = read_checkpoint_state(output["checkpoint"])
        assert state["cfg"]["model"].moe_expert_count == output["keep"]
        assert "last_optimizer_state" not in state
        assert state["extra_state"]["moe_pruning"]["layers"] == output["layers"]
        for i, name in enumerate(names):
            rows = log["layer"] == i
            weights = np.zeros(4)
            np.add.at(weights, log["experts"][rows].ravel(), log["weights"][rows].ravel())
            by_hand = sorted(np.argsort(-weights, kind="stable")[: output["keep"]].tolist())
            layer = output["layers"][f"{name}.moe"]
            assert layer["kept"] == by_hand, name
            np.testing.assert_allclose(layer["scores"], weights, rtol=1e-5)
            key = f"{name}.moe.gate.wg.weight"
            assert torch.equal(state["model"][key], original[key][by_hand])  # rows removed
            ema = state["model"][f"{name}.moe.gate.usage_ema"]
            assert ema.shape == (output["keep"],)


def test_pruned_checkpoint_loads_in_checkpoint_io_and_the_hub(pruned, toy_data, tmp_path):
    import shutil

    from fairseq_moe_plugin.models.moe_transformer import MoETransformerModel

    path = pruned[1]["outputs"][0]["checkpoint"]
    models, cfg, task = load_model_ensemble_and_task(path)
    gate = models[0].encoder.layers[1].moe.gate
    assert gate.wg.weight.shape == (2, 64) and cfg.model.moe_expert_count == 2
    with torch.no_grad():
        out, extra = models[0].eval()(**toy_batch(task)["net_input"])
    assert all(r.expert_index.max() < 2 for r in extra["moe_records"])
    shutil.copy(path, tmp_path / "model.pt")
    hub = MoETransformerModel.from_pretrained(str(tmp_path), checkpoint_file="model.pt",
                                              data_name_or_path=str(toy_data["bin"]),
                                              source_lang="src", target_lang="tgt")  # fmt: skip
    assert len(hub.translate(["a b c"], beam=2)) == 1


@pytest.mark.slow
def test_pruned_checkpoint_quantises_and_exports_to_onnx(pruned, tmp_path):
    from fairseq_moe_cli.export_onnx import main as export_main
    from fairseq_moe_cli.quantize import quantize_checkpoint

    path = pruned[1]["outputs"][1]["checkpoint"]  # E' = 3
    quantize_checkpoint(Path(path), tmp_path / "int8.pt", "dynamic")
    models, cfg, _ = load_model_ensemble_and_task(tmp_path / "int8.pt")
    assert cfg.model.moe_int8 == "dynamic" and cfg.model.moe_expert_count == 3
    onnx = tmp_path / "encoder.onnx"
    assert export_main([str(path), "--out", str(onnx), "--part", "encoder",
                        "--verify-max-sentences", "8"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "encoder.onnx.json").read_text())["verified"]
    # an int8 checkpoint is refused: prune first, then quantise
    code = main([str(tmp_path / "int8.pt"), "--keep", "2", "--out", str(tmp_path / "x")])
    assert code == 2


@pytest.mark.slow
def test_fairseq_generate_decodes_the_pruned_checkpoint(pruned, toy_data, tmp_path):
    path = pruned[1]["outputs"][0]["checkpoint"]
    out = run_cli([BIN / "fairseq-generate", toy_data["bin"], "--user-dir", PLUGIN_DIR, "--path",
                   path, "--gen-subset", "test", "--beam", 2, "--batch-size", 50,
                   "--max-len-b", 10], cwd=tmp_path)  # fmt: skip
    assert sum(line.startswith("H-") for line in out.splitlines()) == 100


# -- a multilingual model: one checkpoint per language pair -------------------------------------


def _multilingual_log(model, path):
    """A hand-made routing log of the multilingual checkpoint's layers (en-de, en-fr): en tokens
    in the encoder pick experts 0 and 1, de tokens in the decoder 2 and 3, fr tokens 0 and 3."""
    names = ["encoder.layers.1", "decoder.layers.1"]
    langs, rows = ["de", "en", "fr"], []
    for pair, target, chosen in ((0, 0, [2, 3]), (1, 2, [0, 3])):
        rows += [(0, 1, pair, [0, 1])] * 3 + [(1, target, pair, chosen)] * 3
    layer, lang, pair, experts = (np.array(c) for c in zip(*rows, strict=True))
    n = len(rows)
    np.savez(path, layer=layer, lang=lang, pair=pair, experts=experts,
             weights=np.full((n, 2), 0.5), sentence=np.zeros(n), batch=np.zeros(n),
             position=np.zeros(n), token=np.zeros(n), entropy=np.zeros(n),
             layer_names=np.array(names), langs=np.array(langs),
             pairs=np.array(["en-de", "en-fr"]), vocab=np.array(["a"]), num_experts=np.array(4),
             k=np.array(2))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory):
    from serve_helpers import train_spm, translation_checkpoint

    root = tmp_path_factory.mktemp("mt")
    spm = train_spm(root)
    path = translation_checkpoint(root, root / "dict.txt")
    return path, spm, _multilingual_log(None, root / "routing.npz")


def test_language_criterion_writes_one_checkpoint_per_pair(multilingual, tmp_path, capsys):
    from fairseq_moe_plugin.serve.engine import EngineOptions, load_engine

    path, spm, log = multilingual
    out = tmp_path / "lang"
    assert main([str(path), "--routing-log", str(log), "--criterion", "language", "--keep", "2",
                 "--fallback-expert", "-1", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "encoder.layers.1.moe: kept [0, 1] (100.0% of the load on en tokens" in printed
    manifest = json.loads((out / "prune.json").read_text())
    kept = {o["pair"]: {p: v["kept"] for p, v in o["layers"].items()} for o in manifest["outputs"]}
    assert kept == {"en-de": {"encoder.layers.1.moe": [0, 1], "decoder.layers.1.moe": [2, 3]},
                    "en-fr": {"encoder.layers.1.moe": [0, 1], "decoder.layers.1.moe": [0, 3]}}  # fmt: skip
    for pair in ("en-de", "en-fr"):
        file = out / f"language_{pair}_keep2.pt"
        engine = load_engine(str(file), EngineOptions(spm_model=str(spm), beam=1))
        assert engine is not None
        state = read_checkpoint_state(file)
        assert state["cfg"]["model"].moe_fallback_expert == -1
        assert state["extra_state"]["moe_pruning"]["pair"] == pair


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_named_and_exits_2(source, pruned, multilingual, dense_checkpoint, tmp_path,
                                        capsys):  # fmt: skip
    path, log = str(source[0]), str(pruned[0] / "routing.npz")
    other = tmp_path / "other.npz"
    data = dict(load_log(log))
    data["num_experts"] = np.array(8)
    np.savez(other, **data)
    renamed = tmp_path / "renamed.npz"
    data = dict(load_log(log))
    data["layer_names"] = np.array(["encoder.layers.0", "decoder.layers.1"])
    np.savez(renamed, **data)
    out = str(tmp_path / "o")
    cases = [
        ([str(tmp_path / "missing.pt"), "--keep", "2"], "checkpoint not found"),
        ([str(dense_checkpoint[0]), "--keep", "2"], "no MoE layer .* a dense checkpoint"),
        ([path, "--keep", "5", "--routing-log", log], "--keep 5 is more than the 4 experts"),
        ([path, "--keep", "1", "--routing-log", log], "--keep 1 is below the top-k .*--moe-top-k 2"),
        ([path, "--keep", "2", "--routing-log", str(other)], "recorded from another model: it has 8"),
        ([path, "--keep", "2", "--routing-log", str(renamed)],
         "recorded from another model: its MoE layers are \\['decoder.layers.1.moe', "
         "'encoder.layers.0.moe'\\]"),
        ([path, "--keep", "2", "--criterion", "language"],
         "--criterion language needs a multilingual model .* translates src-tgt only"),
        ([path, "--keep", "2", "--criterion", "language", "--routing-log", log],
         "--criterion language needs a multilingual model .* has 1 \\(src-tgt\\)"),
        ([path, "--keep", "2", "--routing-log", str(tmp_path / "no.npz")],
         "routing log .*no.npz does not exist"),
        ([str(multilingual[0]), "--keep", "2", "--criterion", "language", "--routing-log",
          str(multilingual[2])],
         "the fallback expert \\(--moe-fallback-expert 0\\) is pruned from "
         "\\['decoder.layers.1.moe'\\]: give the pruned model's --fallback-expert"),
    ]  # fmt: skip
    import re

    for argv, message in cases:
        assert main([*argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err)
    with pytest.raises(SystemExit):  # argparse: an unknown criterion
        main([path, "--keep", "2", "--criterion", "random", "--out", out])
