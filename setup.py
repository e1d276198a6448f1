"""fairseq-moe: a fairseq plugin (``--user-dir``) for sparse Mixture-of-Experts models."""

from setuptools import find_packages, setup

setup(
    name="fairseq-moe-plugin",
    version="0.1.0",
    description="Sparse Mixture-of-Experts transformers for fairseq (--user-dir plugin)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_moe_plugin", "fairseq_moe_plugin.*"]),
    python_requires=">=3.10",
    # torch and fairseq are deliberately not listed: see the Makefile (the fairseq distribution
    # must be installed with --no-deps, and an existing torch build must be kept).
    install_requires=[],
)
