#!/usr/bin/env python
"""Launcher of ``fairseq_moe_cli/benchmark_onnx_generate.py`` (same flags and outputs as the console command
``fairseq-moe-benchmark-onnx-generate``, which ``pip install`` puts on PATH). See that module for the documentation."""

import sys

from fairseq_moe_cli.benchmark_onnx_generate import main

if __name__ == "__main__":
    sys.exit(main())
