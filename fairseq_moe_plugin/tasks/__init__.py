from . import glue  # noqa: F401  (registers the moe_glue task)
