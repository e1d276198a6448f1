"""Analysis of trained models and training runs: library code of the command-line tools.

- ``routing_log.py``: load a translation checkpoint and record its routing, one row per
  (token, MoE layer), teacher-forced or on the generator's output;
- ``routing_analysis.py``: the statistics of a routing log (loads, entropy, Gini, capacity
  overflow, per-language routing and similarity, specialisation); numpy and scipy;
- ``training_log.py``: the one reader of fairseq-train's logs (json or simple text, or a
  tensorboard directory): ``train_inner``, epoch ``train`` and ``valid`` records;
- ``routing_plots.py``: the figures (matplotlib PNGs, HTML heatmaps);
- ``report.py``: the routing report (``summary.json``, figures, ``specialisation.md``);
- ``flops.py``: parameters (total, active per token) and FLOPs per token, fvcore and analytic.

fairseq-train imports only ``fairseq_moe_plugin/__init__.py`` and what it imports; nothing
there imports this folder, so matplotlib, scipy and tensorboard stay out of training.
"""
