"""moe_roberta: the encoder classifier's routing records, presets, classification heads, and
sparse upcycling from a dense RoBERTa."""

import pytest
import torch
from conftest import save_trainer_style_checkpoint
from roberta_helpers import FakeTask as _Task
from roberta_helpers import roberta_args as _args
from roberta_helpers import tokens as _tokens

from fairseq_moe_plugin.models.moe_roberta import MoERobertaModel


def test_tiny_preset_routes_and_classifies():
    task = _Task()
    model = MoERobertaModel.build_model(_args(), task).eval()
    model.register_classification_head("sentence_classification_head", num_classes=3)
    with torch.no_grad():
        logits, extra = model(_tokens(), classification_head_name="sentence_classification_head")
    assert logits.shape == (3, 3)
    (record,) = extra["moe_records"]  # layer 1 of 2 is MoE
    assert record.layer == "encoder.layers.1"
    assert int(record.routed_tokens) == 3 * 9 - 3  # padding is not routed
    assert record.expert_counts_routed.numel() == 4
    experts = model.encoder.sentence_encoder.layers[1].moe.experts
    assert float(experts.fc1_weight.std()) == pytest.approx(0.02, rel=0.1)  # BERT init


@pytest.mark.parametrize("preset,layers,dim", [("moe_roberta_base", 12, 768),
                                               ("moe_roberta_large", 24, 1024)])  # fmt: skip
def test_base_and_large_presets_have_roberta_sizes(preset, layers, dim):
    args = _args(arch=preset)
    from fairseq_moe_plugin.models.moe_roberta import moe_roberta_base, moe_roberta_large

    (moe_roberta_base if preset.endswith("base") else moe_roberta_large)(args)
    assert (args.encoder_layers, args.encoder_embed_dim) == (layers, dim)
    assert args.moe_expert_count == 8 and args.encoder_moe_freq == 2


def test_upcycled_from_dense_roberta_computes_what_it_computed(tmp_path):
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models.roberta import RobertaModel

    task = _Task()
    dense_args = _args("--encoder-layers", 2, "--encoder-embed-dim", 64, "--encoder-ffn-embed-dim",
                       128, "--encoder-attention-heads", 2, arch="roberta")  # fmt: skip
    torch.manual_seed(1)
    dense = RobertaModel.build_model(dense_args, task).eval()
    path = tmp_path / "roberta.pt"
    save_trainer_style_checkpoint(dense, convert_namespace_to_omegaconf(dense_args), path)
    args = _args("--moe-init-from-dense", path, "--moe-top-k", 1, "--moe-normalize-top-k",
                 "--encoder-moe-freq", 1)  # fmt: skip
    model = MoERobertaModel.build_model(args, task).eval()
    tokens = _tokens()
    with torch.no_grad():
        expected, _ = dense(tokens, features_only=True)
        got, extra = model(tokens, features_only=True)
        lm_expected, _ = dense(tokens)
        lm_got, _ = model(tokens)
    assert len(extra["moe_records"]) == 2
    real = tokens.ne(1)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lm_got[real], lm_expected[real], rtol=1e-5, atol=1e-5)


def test_upcycled_from_a_translation_encoder(toy_data):
    """The encoder of a dense ``transformer`` (built with RoBERTa's embedding choices) becomes
    moe_roberta's encoder; its features are the dense encoder's at every real position."""
    from conftest import build_model_and_task, tiny_args, toy_batch

    from fairseq_moe_plugin.models.upcycle import upcycle

    torch.manual_seed(3)
    dense, task, _ = build_model_and_task(
        tiny_args(toy_data["bin"], "--encoder-ffn-embed-dim", 128, "--decoder-ffn-embed-dim",
                  128, "--encoder-learned-pos", "--layernorm-embedding", "--no-scale-embedding",
                  "--max-source-positions", 64, "--activation-fn", "gelu", arch="transformer_tiny")
    )  # fmt: skip
    fake = _Task()
    fake.source_dictionary = task.source_dictionary
    model = MoERobertaModel.build_model(
        _args("--encoder-moe-freq", 1, "--moe-top-k", 1, "--moe-normalize-top-k"), fake
    )
    report = upcycle(model, dense.state_dict(), source="transformer")
    assert report["experts"] == 8 and "encoder.lm_head.dense.weight" in report["new"]
    assert any(k.startswith("decoder.") for k in report["unused"])
    dense.eval(), model.eval()
    sample = toy_batch(task, n=6)
    src = sample["net_input"]["src_tokens"]
    with torch.no_grad():
        expected = dense.encoder(src, sample["net_input"]["src_lengths"])["encoder_out"][0]
        got, _ = model(src, features_only=True)
    real = src.ne(1)
    torch.testing.assert_close(got[real], expected.transpose(0, 1)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--moe-top-k", 5], r"^moe_roberta_tiny: top-k \(--moe-top-k\) must be between 1 and"),
        (["--moe-expert-count", 0], r"^moe_roberta_tiny: .*--moe-expert-count\) must be >= 1"),
        (["--moe-jitter-eps", 1.0], r"^moe_roberta_tiny: jitter_eps \(--moe-jitter-eps\)"),
        (["--encoder-moe-freq", -1], r"^moe_roberta_tiny: --encoder-moe-freq must be >= 0"),
    ],
)
def test_bad_config_errors_name_the_arch_in_use(flags, message):
    with pytest.raises(ValueError, match=message):
        MoERobertaModel.build_model(_args(*flags), _Task())
