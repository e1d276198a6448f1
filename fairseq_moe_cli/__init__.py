"""fairseq-moe's command-line tools, as fairseq keeps its own in ``fairseq_cli/``.

Each tool module has ``main(argv=None) -> int`` and a console command (setup.py's entry
points); ``python scripts/<module>.py`` runs the same ``main``:

- ``score_bleu`` (``fairseq-moe-bleu``): sacrebleu BLEU/chrF of fairseq-generate output;
- ``eval_glue`` (``fairseq-moe-glue-eval``): GLUE predictions, metrics, submission files;
- ``expert_usage`` (``fairseq-moe-usage``): routing log, summary and figures of a checkpoint;
- ``flops`` (``fairseq-moe-flops``): parameters and FLOPs per token;
- ``benchmark_generate`` (``fairseq-moe-benchmark-generate``): generation latency/throughput;
- ``benchmark_moe_layer`` (``fairseq-moe-benchmark-layer``): the MoE layer against the dense
  limit and public MoE patterns (``moe_layer_references``: those baselines;
  ``moe_layer_report``: its summary, targets and tables; ``moe_layer_setting``: one timed
  setting; ``moe_layer_malloc``: the allocator set-ups);
- ``benchmark_expert_parallel`` (``fairseq-moe-benchmark-ep``): expert parallelism measured at
  W = 1, 2, 4 processes, and modelled for 8-512 GPUs (``ep_cost_model``);
- ``flags_table`` (``fairseq-moe-flags``): the table of MoE flags in docs/reference/flags.md;
- ``consolidate`` (``fairseq-moe-consolidate``): a sharded checkpoint as one file, and back;
- ``benchmark_checkpoint`` (``fairseq-moe-benchmark-checkpoint``): save memory and time of
  the two checkpoint formats at W processes.

Library modules without a command: ``recipe_steps`` (the recipes' subprocess steps, paths and
log parsing), ``recipe_data`` (sentencepiece and dictionaries), ``gettext_catalogues`` (reading
Debian's translation catalogues), ``adaptation_report`` (the adaptation studies' tables), which
``examples/translation`` and ``examples/classification`` import; ``quantize_latency`` (the int8
benchmark's timing).
"""
