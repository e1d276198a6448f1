#!/usr/bin/env python
"""Launcher of ``fairseq_moe_cli/expert_usage.py`` (same flags and outputs as the console command
``fairseq-moe-usage``, which ``pip install`` puts on PATH). See that module for the documentation."""

import sys

from fairseq_moe_cli.expert_usage import main

if __name__ == "__main__":
    sys.exit(main())
