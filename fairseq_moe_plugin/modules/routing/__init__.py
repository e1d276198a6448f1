"""Routing: the router (``router.py``), the routing methods and their registry, capacity
(``capacity.py``), the gate's training state (``balancing.py``) and the router losses
(``losses.py``).

The registry below maps every ``--moe-routing`` value to its method object. Adding a routing
method is one new file with a ``RoutingMethod`` subclass (``base.py`` says what it declares) and
one line here; the flag's choices, the validation table (``models/config_rules.py``), FLOPs,
ONNX export, growth and the routing analysis read the method's capabilities, never its name.
See ``docs/contributing/extending.md`` for a worked example.
"""

from __future__ import annotations

from .base import RoutingMethod
from .dense import Dense
from .expert_choice import ExpertChoice
from .output import GateOutput, RoutingMode
from .topk import TopK

ROUTING_METHODS: dict[str, RoutingMethod] = {
    method.name: method
    for method in (
        TopK(),
        Dense(),
        ExpertChoice(),
    )
}


def routing_method(name, flag: str = "--moe-routing") -> RoutingMethod:
    """The method registered as ``name`` (a value of ``flag``); ValueError naming the flag and
    the choices otherwise."""
    try:
        return ROUTING_METHODS[str(name)]
    except KeyError:
        raise ValueError(
            f"routing ({flag}) must be one of {tuple(ROUTING_METHODS)}, got {name!r}"
        ) from None


__all__ = ["GateOutput", "ROUTING_METHODS", "RoutingMethod", "RoutingMode", "routing_method"]
