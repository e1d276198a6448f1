from . import moe_transformer  # noqa: F401  (registers moe_transformer and its presets)
