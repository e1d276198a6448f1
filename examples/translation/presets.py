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
