from . import moe_roberta, moe_transformer  # noqa: F401  (registers the models and presets)
