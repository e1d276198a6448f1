"""Deployment: ONNX export and encrypted checkpoints (the ``serve`` extra's libraries, imported
only by the modules that need them; ``fairseq_moe_plugin`` itself never imports this package)."""
