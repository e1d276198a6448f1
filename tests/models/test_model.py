"""moe_transformer: presets, forward/backward, dense equivalence, records, checkpoints,
incremental decoding, bad configurations."""

import copy

import pytest
import torch
from conftest import build_model_and_task, save_trainer_style_checkpoint, tiny_args, toy_batch
from fairseq import checkpoint_utils
from fairseq.models.transformer import TransformerModel
from fairseq.sequence_generator import SequenceGenerator

from fairseq_moe_plugin.models.moe_transformer import MoETransformerModel
from fairseq_moe_plugin.modules.moe_transformer_layer import (
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
)

PRESETS = [
    "moe_transformer",
    "moe_transformer_tiny",
    "moe_transformer_iwslt_de_en",
    "moe_transformer_wmt_en_de",
    "moe_transformer_wmt_en_de_big",
]


@pytest.mark.parametrize("arch", PRESETS)
def test_every_preset_builds_with_moe_layers(toy_data, arch):
    args = tiny_args(toy_data["bin"], "--moe-expert-count", 4, arch=arch)
    model, _, _ = build_model_and_task(args)
    assert isinstance(model, MoETransformerModel)
    enc_moe = [
        i
        for i, layer in enumerate(model.encoder.layers)
        if isinstance(layer, MoETransformerEncoderLayer)
    ]
    dec_moe = [
        i
        for i, layer in enumerate(model.decoder.layers)
        if isinstance(layer, MoETransformerDecoderLayer)
    ]
    n_enc, n_dec = len(model.encoder.layers), len(model.decoder.layers)
    assert enc_moe == list(range(1, n_enc, 2)) and dec_moe == list(range(1, n_dec, 2))
    layer = model.encoder.layers[1]
    assert layer.moe.num_experts == 4
    assert layer.moe.experts.fc1_weight.shape == (
        4,
        args.encoder_ffn_embed_dim,
        args.encoder_embed_dim,
    )
    names = [n for n, _ in model.named_parameters()]
    assert not any("layers.1.fc1" in n for n in names), "dense FFN of an MoE layer was kept"


def test_forward_backward_and_records(toy_data):
    args = tiny_args(toy_data["bin"], "--encoder-moe-freq", 1, "--decoder-moe-freq", 1)
    model, task, _ = build_model_and_task(args)
    sample = toy_batch(task)
    model.train()
    x, extra = model(**sample["net_input"])
    assert x.shape[:2] == sample["target"].shape
    records = extra["moe_records"]
    assert [r.layer for r in records] == [
        "encoder.layers.0",
        "encoder.layers.1",
        "decoder.layers.0",
        "decoder.layers.1",
    ]
    n_src = int(sample["net_input"]["src_tokens"].ne(task.source_dictionary.pad()).sum())
    n_tgt = int(sample["net_input"]["prev_output_tokens"].ne(task.target_dictionary.pad()).sum())
    assert [int(r.routed_tokens) for r in records] == [n_src, n_src, n_tgt, n_tgt]
    assert all(int(r.expert_counts_routed.sum()) == r.routed_tokens * 2 for r in records)
    loss = x.float().logsumexp(-1).mean() + sum(r.balance_loss + r.z_loss for r in records)
    loss.backward()
    layer = model.encoder.layers[0]
    assert layer.moe.gate.wg.weight.grad is not None
    assert layer.moe.experts.fc1_weight.grad.abs().sum() > 0


def test_freq_zero_is_the_dense_transformer(toy_data):
    common = ["--encoder-ffn-embed-dim", 128, "--decoder-ffn-embed-dim", 128]
    moe_args = tiny_args(toy_data["bin"], *common, "--encoder-moe-freq", 0, "--decoder-moe-freq", 0)
    dense_args = tiny_args(toy_data["bin"], *common, arch="transformer_tiny")
    torch.manual_seed(3)
    moe, task, _ = build_model_and_task(moe_args)
    torch.manual_seed(3)
    dense, _, _ = build_model_and_task(dense_args)
    assert isinstance(dense, TransformerModel) and not isinstance(dense, MoETransformerModel)
    moe_sd, dense_sd = moe.state_dict(), dense.state_dict()
    assert moe_sd.keys() == dense_sd.keys()
    for key in moe_sd:
        assert torch.equal(moe_sd[key], dense_sd[key]), key
    sample = toy_batch(task)
    moe.eval(), dense.eval()
    out_moe, extra = moe(**sample["net_input"])
    out_dense, _ = dense(**sample["net_input"])
    assert torch.equal(out_moe, out_dense)
    assert extra["moe_records"] == []


def test_checkpoint_save_load_gives_identical_outputs(toy_data, tmp_path):
    args = tiny_args(toy_data["bin"], "--encoder-moe-freq", 1, "--decoder-moe-freq", 1)
    model, task, cfg = build_model_and_task(args)
    model.eval()
    path = tmp_path / "checkpoint.pt"
    save_trainer_style_checkpoint(model, cfg, path)
    models, loaded_cfg, loaded_task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    loaded = models[0].eval()
    assert isinstance(loaded, MoETransformerModel)
    sample = toy_batch(task)
    with torch.no_grad():
        a, extra_a = model(**sample["net_input"])
        b, extra_b = loaded(**sample["net_input"])
    assert torch.equal(a, b)
    for ra, rb in zip(extra_a["moe_records"], extra_b["moe_records"], strict=True):
        assert torch.equal(ra.expert_counts, rb.expert_counts)


def _generate(model, task, sample, incremental: bool, beam=4):
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_b=20)
    generator.model.has_incremental = incremental  # False: the whole prefix every step
    with torch.no_grad():
        return generator.generate([model], sample)


def test_incremental_decoding_equals_full_decoding(toy_data):
    args = tiny_args(
        toy_data["bin"],
        "--encoder-moe-freq",
        1,
        "--decoder-moe-freq",
        1,
        "--moe-top-k",
        2,
        "--moe-capacity-factor",
        0.5,
    )
    model, task, _ = build_model_and_task(args)
    model.eval()
    sample = toy_batch(task, n=6)
    # Decoder step by step vs the whole target prefix at once.
    net_input = sample["net_input"]
    with torch.no_grad():
        encoder_out = model.encoder(net_input["src_tokens"], net_input["src_lengths"])
        full, _ = model.decoder(net_input["prev_output_tokens"], encoder_out=encoder_out)
        state = {}
        steps = []
        for t in range(net_input["prev_output_tokens"].size(1)):
            out, extra = model.decoder(
                net_input["prev_output_tokens"][:, : t + 1],
                encoder_out=encoder_out,
                incremental_state=state,
            )
            steps.append(out)
            assert len(extra["moe_records"]) == 2
    incremental = torch.cat(steps, dim=1)
    pad = net_input["prev_output_tokens"].eq(task.target_dictionary.pad())
    torch.testing.assert_close(incremental[~pad], full[~pad], rtol=1e-5, atol=1e-5)
    # Beam search: same tokens and scores with and without incremental state.
    hyps_inc = _generate(model, task, sample, incremental=True)
    hyps_full = _generate(model, task, sample, incremental=False)
    for a, b in zip(hyps_inc, hyps_full, strict=True):
        for ha, hb in zip(a, b, strict=True):
            assert torch.equal(ha["tokens"], hb["tokens"])
            torch.testing.assert_close(ha["score"], hb["score"], rtol=1e-5, atol=1e-5)


def test_records_survive_reorder_encoder_out(toy_data):
    args = tiny_args(toy_data["bin"])
    model, task, _ = build_model_and_task(args)
    model.eval()
    sample = toy_batch(task, n=3)
    encoder_out = model.encoder(
        sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    )
    assert len(encoder_out["moe_records"]) == 1
    reordered = model.encoder.reorder_encoder_out(encoder_out, torch.tensor([2, 0, 0, 1]))
    assert reordered["moe_records"] is encoder_out["moe_records"]
    assert reordered["encoder_out"][0].shape[1] == 4


def test_eval_routing_does_not_depend_on_batch_mates(toy_data):
    """Default eval is dropless: a sentence's output is the same alone or in a batch."""
    args = tiny_args(toy_data["bin"], "--moe-capacity-factor", 0.25)
    model, task, _ = build_model_and_task(args)
    model.eval()
    batch = toy_batch(task, n=8)
    ids = batch["id"].tolist()
    with torch.no_grad():
        full, _ = model(**batch["net_input"])
        task.load_dataset("valid")
        ds = task.dataset("valid")
        alone = ds.collater([ds[ids[0]]])
        single, _ = model(**alone["net_input"])
    n = single.shape[1]
    torch.testing.assert_close(single[0], full[0, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--moe-expert-count", 2, "--moe-top-k", 3], "--moe-top-k"),
        (["--moe-top-k", 0], "--moe-top-k"),
        (["--moe-expert-count", 0], "--moe-expert-count"),
        (["--encoder-moe-freq", -1], "--encoder-moe-freq"),
        (["--decoder-moe-freq", -2], "--decoder-moe-freq"),
        (["--moe-expert-ffn-dim", 0], "--moe-expert-ffn-dim"),
        (["--moe-jitter-eps", 1.5], "--moe-jitter-eps"),
    ],
)
def test_bad_config_names_the_flag(toy_data, flags, message):
    args = tiny_args(toy_data["bin"], *flags)
    with pytest.raises(ValueError, match=rf"^moe_transformer_tiny: .*{message}"):  # the arch in use
        build_model_and_task(args)


def test_layer_drop_does_not_leak_stale_records(toy_data):
    args = tiny_args(toy_data["bin"], "--encoder-moe-freq", 1, "--encoder-layerdrop", 0.999)
    model, task, _ = build_model_and_task(args)
    model.train()
    sample = toy_batch(task, n=4)
    _, extra = model(**copy.deepcopy(sample["net_input"]))
    enc = [r for r in extra["moe_records"] if r.layer.startswith("encoder")]
    assert len(enc) <= 2  # layers skipped by LayerDrop give no record (with p=.999 usually 0)
    _, extra2 = model(**sample["net_input"])
    enc2 = [r for r in extra2["moe_records"] if r.layer.startswith("encoder")]
    assert all(not any(r is s for s in enc) for r in enc2), "a record was reused"


@pytest.mark.parametrize("flag, reuse", [((), True), (("--moe-no-grad-buffer-reuse",), False)])
def test_grad_buffer_reuse_flag_reaches_every_moe_layer(toy_data, flag, reuse):
    args = tiny_args(toy_data["bin"], "--encoder-moe-freq", 1, "--decoder-moe-freq", 1, *flag)
    model, task, _ = build_model_and_task(args)
    experts = [m for m in model.modules() if m.__class__.__name__ == "StackedExperts"]
    assert len(experts) == 4
    assert all(e.grad_buffers.enabled == reuse for e in experts)
    sample = toy_batch(task)
    model.train()
    for _ in range(2):  # two updates, gradients cleared as fairseq does
        net_output = model(**sample["net_input"])
        net_output[0].float().sum().backward()
        pointers = [e.fc1_weight.grad.data_ptr() for e in experts]
        model.zero_grad(set_to_none=True)
    assert all(len(e.grad_buffers) == (2 if reuse else 0) for e in experts)
    again = model(**sample["net_input"])
    again[0].float().sum().backward()
    if reuse:  # the same memory again (without reuse, malloc may or may not return it)
        assert [e.fc1_weight.grad.data_ptr() for e in experts] == pointers


def test_normformer_options_are_refused_by_moe_decoder_layers(toy_data):
    from fairseq.models.transformer import TransformerConfig

    from fairseq_moe_plugin.models.moe_config import moe_config_from_namespace

    args = tiny_args(toy_data["bin"])
    build_model_and_task(args)  # fills the preset's defaults into args
    cfg = TransformerConfig.from_namespace(args)
    MoETransformerDecoderLayer(cfg, moe_config_from_namespace(args), "decoder.layers.1")
    cfg.scale_heads = True  # what fairseq's NormFormer configs set
    with pytest.raises(ValueError, match=r"decoder.layers.1: NormFormer .* sets \['c_attn'\]"):
        MoETransformerDecoderLayer(cfg, moe_config_from_namespace(args), "decoder.layers.1")
