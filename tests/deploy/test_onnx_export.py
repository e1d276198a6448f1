"""ONNX export (fairseq_moe_plugin/deploy/onnx_export.py, onnx_moe.py, the export CLI): tiny
moe_roberta classifiers and a tiny moe_transformer encoder, exported with each MoE formulation and
run by onnxruntime on batches whose size, lengths and padding differ from the traced example;
the outputs must equal PyTorch eval within 1e-4 with the same predictions."""

import pytest
import torch
from conftest import save_trainer_style_checkpoint, tiny_args
from roberta_helpers import FakeTask, roberta_args

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fairseq_moe_plugin.deploy import onnx_export as ox  # noqa: E402
from fairseq_moe_plugin.deploy.onnx_moe import ExportError  # noqa: E402

HEAD = ox.DEFAULT_HEAD


def _spread_moe_weights(model, seed=1):
    """Router and experts with a larger spread than BERT's 0.02, so that routing is decided by
    clear margins and the activation's shape matters (a parallel FFN's experts start at 0)."""
    from fairseq_moe_plugin.modules.moe_layer import MoELayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoELayer):
                m.gate.wg.weight.copy_(torch.randn(m.gate.wg.weight.shape, generator=g))
                for p in m.experts.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _classifier(*flags):
    from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel

    model = MoERobertaModel.build_model(roberta_args(*flags), FakeTask())
    model.register_classification_head(HEAD, num_classes=3)
    return _spread_moe_weights(model).eval()


def _batches(left_pad=False, bos=0):
    """Batches of 5 x 13 and 1 x 3 tokens (the export example is 3 x 7), with padding (1)."""
    torch.manual_seed(5)
    a = torch.randint(4, 44, (5, 13))
    a[:, -1] = 2
    b = torch.tensor([[4, 9, 2]])
    for row, n in ((1, 4), (3, 11)):  # pad the first/last n positions
        if left_pad:
            a[row, :n] = 1
        else:
            a[row, -n:] = 1
            a[row, -n - 1] = 2
    if bos is not None:
        a[:, 0] = torch.where(a[:, 0].eq(1), 1, bos)
        b[:, 0] = bos
    return [a, b]


def _export(model, part, moe_op, tmp_path, head=HEAD):
    module = ox.build_export_module(model, part, head, moe_op)
    dictionary = (
        model.encoder.sentence_encoder if part == "classifier" else model.encoder
    ).dictionary
    inputs = ox.example_inputs(part, dictionary, 64, left_pad=part == "encoder")
    path = ox.export_onnx(module, tmp_path / f"{part}_{moe_op}.onnx", inputs, part, 64)
    return module, path


def _op_types(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _check(model, path, part="classifier", left_pad=False):
    session = ox.ort_session(path, threads=1)
    batches = _batches(left_pad, bos=0 if part == "classifier" else None)
    result = ox.compare(session, part, batches, lambda t: ox.reference(model, part, HEAD, t))
    assert result["sentences"] == 6
    assert result["ok"], result
    return result


@pytest.mark.parametrize("moe_op,k,normalize,activation", [
    ("plain", 1, True, "gelu"), ("plain", 2, False, "gelu"), ("plain", 2, True, "gelu"),
    ("fused", 1, False, "relu"), ("fused", 2, True, "relu"), ("fused", 2, False, "gelu_fast"),
])  # fmt: skip
def test_classifier_matches_pytorch(tmp_path, moe_op, k, normalize, activation):
    flags = ["--moe-top-k", k, "--moe-activation-fn", activation]
    model = _classifier(*flags, *(["--moe-normalize-top-k"] if normalize else []))
    _, path = _export(model, "classifier", moe_op, tmp_path)
    _check(model, path)
    ops = _op_types(path)
    assert not ops & {"Loop", "If", "NonZero", "Scan"}  # static: no loop, no data-dependent shape
    if moe_op == "plain":
        assert {"TopK", "ScatterElements"} <= ops and "MoE" not in ops
    else:
        assert "MoE" in ops and "TopK" not in ops


def test_fused_op_tanh_approximates_erf_gelu(tmp_path):
    """onnxruntime's MoE gelu is the tanh approximation: the graph equals our PyTorch model of
    the op, and differs from the erf-gelu model by the approximation."""
    model = _classifier("--moe-top-k", 2, "--moe-normalize-top-k")
    module, path = _export(model, "classifier", "fused", tmp_path)
    session = ox.ort_session(path, threads=1)
    batches = _batches()
    op_model = ox.compare(session, "classifier", batches, lambda t: [module(t)])
    assert op_model["max_abs_diff"] <= 1e-4
    exact = ox.compare(session, "classifier", batches,
                       lambda t: ox.reference(model, "classifier", HEAD, t))  # fmt: skip
    assert exact["max_abs_diff"] > op_model["max_abs_diff"]


def test_qmoe_int8_experts(tmp_path):
    """QMoE runs on CPU: the graph equals the same int8 weights dequantised in PyTorch, and the
    fp32 model within the quantisation error."""
    model = _classifier("--moe-top-k", 2, "--moe-normalize-top-k", "--moe-activation-fn", "relu")
    module, path = _export(model, "classifier", "qmoe", tmp_path)
    assert "QMoE" in _op_types(path)
    session = ox.ort_session(path, threads=1)
    int8 = ox.compare(session, "classifier", _batches(), lambda t: [module(t)])
    assert int8["ok"], int8
    fp32 = ox.compare(session, "classifier", _batches(),
                      lambda t: ox.reference(model, "classifier", HEAD, t), atol=0.05)  # fmt: skip
    assert fp32["ok"], fp32


@pytest.mark.parametrize("moe_op", ["plain", "fused"])
def test_dense_routing_parallel_placement_pre_norm_router_options(tmp_path, moe_op):
    model = _classifier("--moe-routing", "dense", "--moe-expert-placement", "parallel",
                        "--encoder-normalize-before", "--moe-router-bias",
                        "--moe-router-temperature", 2.0, "--encoder-moe-freq", 1,
                        "--moe-activation-fn", "relu")  # fmt: skip
    with torch.no_grad():
        for layer in model.encoder.sentence_encoder.layers:
            layer.moe.gate.wg.bias.normal_()
    _, path = _export(model, "classifier", moe_op, tmp_path)
    _check(model, path)


@pytest.mark.parametrize("moe_op", ["plain", "fused"])
def test_non_finite_router_logits_fall_back_as_in_pytorch(tmp_path, moe_op):
    model = _classifier("--moe-top-k", 2, "--moe-activation-fn", "relu",
                        "--moe-fallback-expert", 1)  # fmt: skip
    with torch.no_grad():  # expert 2's logit is NaN for every token: all go to expert 1
        model.encoder.sentence_encoder.layers[1].moe.gate.wg.weight[2, 0] = float("nan")
    _, path = _export(model, "classifier", moe_op, tmp_path)
    _check(model, path)  # a NaN anywhere would fail the comparison


@pytest.mark.parametrize("moe_op", ["plain", "fused"])
def test_translation_encoder_export(tmp_path, moe_op):
    """moe_transformer's encoder (sinusoidal positions, left padding): encoder_out at real
    positions and the padding mask equal PyTorch's; src_lengths is a graph input."""
    from fairseq_moe_plugin.models.moe_transformer import MoETransformerModel

    task = FakeTask()
    task.target_dictionary = task.source_dictionary
    args = tiny_args("/unused", "--moe-top-k", 2, "--moe-normalize-top-k", "--encoder-moe-freq",
                     1, arch="moe_transformer_tiny")  # fmt: skip
    model = _spread_moe_weights(MoETransformerModel.build_model(args, task)).eval()
    _, path = _export(model, "encoder", moe_op, tmp_path)
    session = ox.ort_session(path, threads=1)
    assert [i.name for i in session.get_inputs()] == ["src_tokens", "src_lengths"]
    assert [o.name for o in session.get_outputs()] == ["encoder_out", "encoder_padding_mask"]
    _check(model, path, part="encoder", left_pad=True)
    with pytest.raises(ExportError, match="does not apply to a translation model: use --part tr"):
        ox.build_export_module(model, "classifier")


def test_unsupported_models_and_options_are_refused():
    from fairseq.models.roberta import RobertaModel

    dense = RobertaModel.build_model(roberta_args(arch="roberta_base"), FakeTask())
    with pytest.raises(ExportError, match="supports moe_roberta"):
        ox.build_export_module(dense, "classifier")
    model = _classifier()
    with pytest.raises(ExportError, match="no classification head 'nope'.*sentence_classification"):
        ox.build_export_module(model, "classifier", head="nope")
    with pytest.raises(ExportError, match="--part encoder does not apply to a moe_roberta"):
        ox.build_export_module(model, "encoder")
    with pytest.raises(ExportError, match="unknown --moe-op"):
        ox.build_export_module(model, "classifier", moe_op="sparse")
    cases = [
        (["--moe-expert-type", "lora"], "plain", "LoRAExperts experts are not supported"),
        (["--moe-eval-capacity-factor", 0.5], "plain", "can drop tokens"),
        (["--moe-activation-fn", "tanh"], "fused", "'tanh' has no counterpart"),
    ]
    for flags, moe_op, message in cases:
        with pytest.raises(ExportError, match=message):
            ox.build_export_module(_classifier(*flags), "classifier", moe_op=moe_op)
    # a capacity that can never bind (factor * k >= E) is dropless, hence fine
    ox.build_export_module(_classifier("--moe-eval-capacity-factor", 2.0), "classifier")


def _write_split(folder, dictionary, lines):
    from fairseq.data import indexed_dataset

    folder.mkdir(parents=True, exist_ok=True)
    dictionary.save(str(folder / "dict.txt"))
    builder = indexed_dataset.make_builder(str(folder / "test.bin"), impl="mmap",
                                           vocab_size=len(dictionary))  # fmt: skip
    for line in lines:
        builder.add_item(dictionary.encode_line(line, add_if_not_exist=False).int())
    builder.finalize(str(folder / "test.idx"))


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    """A tiny moe_roberta sentence_prediction checkpoint with a binarised test split."""
    from fairseq import tasks
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    root = tmp_path_factory.mktemp("onnx_cls")
    words = Dictionary()
    for i in range(40):
        words.add_symbol(f"w{i}")
    labels = Dictionary()
    for label in ("0", "1", "2"):
        labels.add_symbol(label)
    torch.manual_seed(2)
    sentences = [" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (int(n),)))
                 for n in torch.randint(2, 20, (12,))]  # fmt: skip
    _write_split(root / "data" / "input0", words, sentences)
    _write_split(root / "data" / "label", labels, [str(i % 3) for i in range(12)])
    args = roberta_args("--moe-top-k", 2, "--moe-normalize-top-k", "--init-token", 0)
    args.data = str(root / "data")
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = _spread_moe_weights(task.build_model(cfg.model))
    path = root / "checkpoint.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    return path


def test_cli_exports_and_verifies_on_the_test_split(classifier_checkpoint, tmp_path, capsys):
    import json

    from fairseq_moe_cli.export_onnx import main

    out = tmp_path / "model.onnx"
    assert main([str(classifier_checkpoint), "--out", str(out), "--verify-batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert (
        "verify on 12 sentences (3 batches)" in printed and "equal predictions 100.00%" in printed
    )
    report = json.loads((tmp_path / "model.onnx.json").read_text())
    assert report["verified"] and report["verify"]["max_abs_diff"] <= 1e-4
    assert report["inputs"] == ["src_tokens"] and report["classes"] == ["0", "1", "2"]


def test_cli_reads_encrypted_checkpoints_and_names_bad_input(classifier_checkpoint, tmp_path,
                                                             capsys):  # fmt: skip
    from fairseq_moe_cli.export_onnx import main
    from fairseq_moe_plugin.deploy.encryption import encrypt_file, new_key_file

    key = new_key_file(tmp_path / "key")
    sealed = encrypt_file(classifier_checkpoint, tmp_path / "sealed.pt", key)
    out = str(tmp_path / "m.onnx")
    assert main([str(sealed), "--out", out, "--decrypt-key-file", str(key), "--no-verify"]) == 0
    capsys.readouterr()
    bad = [
        ([str(tmp_path / "missing.pt"), "--out", out], "not found"),
        ([str(sealed), "--out", out], "encrypted checkpoint: give its key file"),
        ([str(classifier_checkpoint), "--out", out, "--head", "nope"], "it has: sentence_classif"),
        ([str(classifier_checkpoint), "--out", out, "--part", "encoder"], "use --part classifier"),
        ([str(classifier_checkpoint), "--out", out, "--verify-text", str(tmp_path / "no.txt"),
          "--spm-model", str(tmp_path / "spm.model")], "no.txt does not exist"),
    ]  # fmt: skip
    for argv, message in bad:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
