from .experts import StackedExperts, get_activation_fn  # noqa: F401
from .gate import (  # noqa: F401
    GateOutput,
    TopKGate,
    capacity_keep_mask,
    check_routing_options,
    expert_capacity,
    load_balance_loss,
    router_z_loss,
    routing_entropy,
)
from .moe_layer import MoELayer  # noqa: F401
from .record import MoERecord  # noqa: F401
