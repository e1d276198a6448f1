"""fairseq-moe: a fairseq plugin (``--user-dir``) for sparse Mixture-of-Experts models, and its
command-line tools (``fairseq_moe_cli``)."""

from setuptools import find_packages, setup

setup(
    name="fairseq-moe-plugin",
    version="0.1.0",
    description="Sparse Mixture-of-Experts transformers for fairseq (--user-dir plugin)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(
        include=["fairseq_moe_plugin", "fairseq_moe_plugin.*", "fairseq_moe_cli"]
    ),
    python_requires=">=3.10",
    # torch and fairseq are deliberately not listed: see the Makefile (the fairseq distribution
    # must be installed with --no-deps, and an existing torch build must be kept). None of the
    # packages below pulls torch.
    install_requires=[
        "numpy",
        "sentencepiece",  # tasks/glue_cache.py
        "scipy",  # analysis (Jensen-Shannon), eval_glue (Pearson, Spearman)
        "scikit-learn",  # eval_glue (accuracy, F1, MCC)
        "sacrebleu>=2.0",  # score_bleu
        "matplotlib",  # analysis/routing_plots.py
        "fvcore",  # analysis/flops.py
        "tensorboard",  # analysis/training_log.py reads --tensorboard-logdir
    ],
    extras_require={
        "dev": ["pytest>=7", "ruff", "mkdocs==1.6.1"],  # mkdocs: make docs, tests/test_docs.py
        # examples/translation: build_gettext_corpus.py reads gettext catalogues with polib.
        "examples": ["polib"],
        # Deployment (docs/deploy.md): ONNX export and its runtime, the inference
        # server and its metrics, and encrypted checkpoints. None of them pulls torch.
        "serve": [
            "onnx",
            "onnxruntime",
            "onnxscript",
            "fastapi",
            "uvicorn[standard]",  # httptools and uvloop: the fast HTTP parser and event loop
            "httpx",
            "prometheus-client",
            "cryptography",
        ],
    },
    entry_points={
        "console_scripts": [
            "fairseq-moe-bleu = fairseq_moe_cli.score_bleu:main",
            "fairseq-moe-glue-eval = fairseq_moe_cli.eval_glue:main",
            "fairseq-moe-usage = fairseq_moe_cli.expert_usage:main",
            "fairseq-moe-flops = fairseq_moe_cli.flops:main",
            "fairseq-moe-benchmark-generate = fairseq_moe_cli.benchmark_generate:main",
            "fairseq-moe-benchmark-layer = fairseq_moe_cli.benchmark_moe_layer:main",
            "fairseq-moe-count-ops = fairseq_moe_cli.count_ops:main",
            "fairseq-moe-benchmark-ep = fairseq_moe_cli.benchmark_expert_parallel:main",
            "fairseq-moe-benchmark-logging = fairseq_moe_cli.benchmark_logging:main",
            "fairseq-moe-flags = fairseq_moe_cli.flags_table:main",
            "fairseq-moe-grow-experts = fairseq_moe_cli.grow_experts:main",
            "fairseq-moe-quantize = fairseq_moe_cli.quantize:main",
            "fairseq-moe-export-onnx = fairseq_moe_cli.export_onnx:main",
            "fairseq-moe-benchmark-onnx = fairseq_moe_cli.benchmark_onnx:main",
            "fairseq-moe-serve = fairseq_moe_cli.serve:main",
            "fairseq-moe-benchmark-serve = fairseq_moe_cli.benchmark_serve:main",
            "fairseq-moe-benchmark-quantize = fairseq_moe_cli.benchmark_quantize:main",
            "fairseq-moe-consolidate = fairseq_moe_cli.consolidate:main",
            "fairseq-moe-benchmark-checkpoint = fairseq_moe_cli.benchmark_checkpoint:main",
            "fairseq-moe-prune-experts = fairseq_moe_cli.prune_experts:main",
            "fairseq-moe-prune-report = fairseq_moe_cli.prune_report:main",
            "fairseq-moe-benchmark-onnx-generate = fairseq_moe_cli.benchmark_onnx_generate:main",
        ]
    },
)
