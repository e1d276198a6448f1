#!/usr/bin/env python
"""Launcher of ``fairseq_moe_cli/prune_experts.py`` (same flags and outputs as the console command
``fairseq-moe-prune-experts``, which ``pip install`` puts on PATH). See that module for the documentation."""

import sys

from fairseq_moe_cli.prune_experts import main

if __name__ == "__main__":
    sys.exit(main())
