"""One naming scheme for MoE layers and the metrics logged about them. Every reader and writer
of these strings imports this module; none formats or splits them by hand.

A layer has two names:

- its **module name**, the path of its layer in the model: ``encoder.layers.1``,
  ``decoder.layers.3`` (``moe_roberta``'s layers are ``encoder.layers.<i>`` too). Routing
  records (``MoERecord.layer``), routing logs and analysis figures use it;
- its **short name**, ``enc1``, ``dec3``: what fairseq's logs show.

From the short name come

- the criterion's logging-output keys (summable counts, one update's batches and workers added
  up by fairseq): ``moe_count:<short>:<expert>`` (the router's assignments to an expert) and
  ``moe_layer:<short>:<stat>`` (per-layer sums);
- the logged metric names: ``moe_<short>_<stat>`` (``moe_enc1_cv``) and
  ``moe_<short>_load_e<expert>`` (``moe_enc1_load_e3``, an expert's share of the layer).

Plain Python; no torch or fairseq.
"""

from __future__ import annotations

import re

SIDES = ("encoder", "decoder")
_SHORT_SIDE = {"encoder": "enc", "decoder": "dec"}
_MODULE_RE = re.compile(r"^(encoder|decoder)\.layers\.(\d+)$")
_SHORT_RE = re.compile(r"^(enc|dec)(\d+)$")
_COUNT_PREFIX = "moe_count:"
_LAYER_STAT_PREFIX = "moe_layer:"
_LOAD_RE = re.compile(r"^moe_((?:enc|dec)\d+)_load_e(\d+)$")
METRIC_PREFIX = "moe_"  # every routing metric's name starts with it


def module_name(side: str, index: int) -> str:
    """``("encoder", 1)`` -> ``encoder.layers.1``."""
    if side not in SIDES:
        raise ValueError(f"layer side must be one of {SIDES}, got {side!r}")
    return f"{side}.layers.{index}"


def parse_layer(name: str) -> tuple[str, int]:
    """(side, index) of a module name (``encoder.layers.1``) or a short name (``enc1``)."""
    match = _MODULE_RE.match(name)
    if match is not None:
        return match.group(1), int(match.group(2))
    match = _SHORT_RE.match(name)
    if match is not None:
        side = "encoder" if match.group(1) == "enc" else "decoder"
        return side, int(match.group(2))
    raise ValueError(
        f"{name!r} is not an MoE layer name (expected encoder.layers.<i>, decoder.layers.<i>, "
        "enc<i> or dec<i>)"
    )


def short_name(name: str) -> str:
    """``encoder.layers.3`` -> ``enc3`` (a short name is returned unchanged)."""
    side, index = parse_layer(name)
    return f"{_SHORT_SIDE[side]}{index}"


def layer_side(name: str) -> str:
    """``encoder`` or ``decoder``, from either kind of name."""
    return parse_layer(name)[0]


def layer_order(name: str) -> tuple[int, int]:
    """Sort key putting layers in model order: the encoder's, then the decoder's, by index."""
    side, index = parse_layer(name)
    return SIDES.index(side), index


# -- the criterion's logging outputs -------------------------------------------------------------


def count_key(layer: str, expert: int) -> str:
    """``moe_count:enc1:3``: the router's assignments to expert 3 of layer ``enc1``."""
    return f"{_COUNT_PREFIX}{short_name(layer)}:{expert}"


def parse_count_key(key: str) -> tuple[str, int] | None:
    """(short layer name, expert) of a ``count_key``; None for any other key."""
    if not key.startswith(_COUNT_PREFIX):
        return None
    layer, _, expert = key[len(_COUNT_PREFIX) :].rpartition(":")
    return layer, int(expert)


def layer_stat_key(layer: str, stat: str) -> str:
    """``moe_layer:enc1:dropped``: a per-layer sum in the logging outputs."""
    return f"{_LAYER_STAT_PREFIX}{short_name(layer)}:{stat}"


def is_internal_key(key: str) -> bool:
    """True for the logging-output keys that are summed, never logged themselves."""
    return key.startswith((_COUNT_PREFIX, _LAYER_STAT_PREFIX))


# -- logged metric names -------------------------------------------------------------------------


def layer_metric(layer: str, stat: str) -> str:
    """``moe_enc1_cv``: a per-layer metric as fairseq logs it."""
    return f"{METRIC_PREFIX}{short_name(layer)}_{stat}"


def load_metric(layer: str, expert: int) -> str:
    """``moe_enc1_load_e3``: expert 3's share of layer ``enc1``'s assignments."""
    return f"{METRIC_PREFIX}{short_name(layer)}_load_e{expert}"


def parse_load_metric(name: str) -> tuple[str, int] | None:
    """(short layer name, expert) of a ``load_metric`` name; None for any other name."""
    match = _LOAD_RE.match(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def is_routing_metric(name: str) -> bool:
    """True for the routing metrics of this plugin (``moe_...``, ``valid_`` prefix removed)."""
    return name.startswith(METRIC_PREFIX) and not is_internal_key(name)
