"""The translation recipe's model presets: ``run.py --model NAME`` trains ``MODEL_PRESETS[NAME]``
(fairseq-train flags), and ``compare_dense_moe.py`` compares the MoE model with its two dense
references. Plain data; both scripts import it, neither imports the other."""

# A CPU-sized translation model (2 cores train it at a few thousand words/s): a deep encoder and
# a shallow decoder (Kasai et al., 2021: most of the quality, a fraction of the decoding cost),
# width 256, 4 heads.
_SHAPE = ["--encoder-layers", "4", "--decoder-layers", "2", "--encoder-embed-dim", "256",
          "--decoder-embed-dim", "256", "--encoder-attention-heads", "4",
          "--decoder-attention-heads", "4"]  # fmt: skip


def _ffn(dim: int) -> list[str]:
    return ["--encoder-ffn-embed-dim", str(dim), "--decoder-ffn-embed-dim", str(dim)]


MODEL_PRESETS = {
    # FFN 1024; every 2nd FFN is MoE (encoder layers 1, 3; decoder layer 1): 8 experts, top-2.
    "moe": ["--arch", "moe_transformer", *_SHAPE, *_ffn(1024), "--encoder-moe-freq", "2",
            "--decoder-moe-freq", "2", "--moe-expert-count", "8", "--moe-top-k", "2"],
    # Dense references (compare_dense_moe.py), every FFN dense, same shape otherwise.
    # Same FLOPs per token: FFN 1536 = (1024 + 2 * 1024) / 2, the mean active FFN width of a
    # dense and an MoE (top-2) layer, in both stacks; the router's d x E is left out.
    "dense_flops": ["--arch", "transformer", *_SHAPE, *_ffn(1536)],
    # Same parameters: FFN 4608 = (1024 + 8 * 1024) / 2 (the router's d x E aside).
    "dense_params": ["--arch", "transformer", *_SHAPE, *_ffn(4608)],
}  # fmt: skip

# What compare_dense_moe.py trains, in order (the first run prepares the data the others reuse).
COMPARED = ("moe", "dense_flops", "dense_params")

# What routing_study.py compares: name -> (the preset, the fairseq-train flags added to it). Every
# MoE variant has the shape and the active FFN width per token of ``moe`` (2 x 1024: two experts
# of 1024, one of 2048, or a routed and a shared expert of 1024 each; expert choice with capacity
# factor 2 gives a token 2 experts on average), and ``dense_flops`` matches their FLOPs per token.
# The first is the baseline the others are compared with.
ROUTING_VARIANTS = {
    # top-2 with the Switch balance loss (the criterion's default weight): today's baseline.
    "top2": ("moe", []),
    # top-1 (Switch Transformer), experts twice as wide.
    "top1": ("moe", ["--moe-top-k", "1", "--moe-expert-ffn-dim", "2048"]),
    # one shared expert + top-1 routed (DeepSeekMoE, Dai et al. 2024).
    "shared_top1": ("moe", ["--moe-top-k", "1", "--moe-shared-experts", "1"]),
    # auxiliary-loss-free balancing (Wang et al. 2024), no balance loss.
    "auxfree_top2": ("moe", ["--moe-bias-balancing-rate", "0.01",
                             "--moe-balance-loss-weight", "0"]),
    # expert-output masking (NLLB Team 2022), p = 0.2.
    "top2_eom": ("moe", ["--moe-eom", "0.2"]),
    # expert choice (Zhou et al. 2022) in the encoder, top-2 in the decoder (expert choice is
    # not causal).
    "ec_enc_top2_dec": ("moe", ["--moe-routing", "expert_choice", "--moe-decoder-routing", "topk",
                                "--moe-expert-capacity-factor", "2"]),
    # the dense model with the MoE models' FLOPs per token.
    "dense_flops": ("dense_flops", []),
}  # fmt: skip
