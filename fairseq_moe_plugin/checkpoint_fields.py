"""What every checkpoint reader of the plugin shares: its error, and the reader of a saved
option. Kept apart from ``checkpoint_io.py`` (the loader) so that the sharded-checkpoint code,
which the loader calls, can use them without importing the loader."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with the file and the reason."""


def saved_option(state: dict, section: str, name: str, default=None):
    """Option ``name`` of a checkpoint state's saved config: ``cfg.<section>.<name>`` (an
    OmegaConf config, or the plain containers a checkpoint file holds, whose model section may
    be the legacy ``argparse.Namespace``), else the legacy ``args.<name>``; ``default`` when
    unset."""
    cfg = state.get("cfg")
    part = cfg.get(section) if isinstance(cfg, dict) else getattr(cfg, section, None)
    if part is None:
        part = state.get("args")
    value = part.get(name) if isinstance(part, dict) else getattr(part, name, None)
    return default if value is None else value
