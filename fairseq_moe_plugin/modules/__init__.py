from .experts import StackedExperts, get_activation_fn  # noqa: F401
from .gate import TopKGate, check_routing_options  # noqa: F401
from .moe_layer import MoELayer  # noqa: F401
from .record import MoERecord  # noqa: F401
from .routing import GateOutput, RoutingMode  # noqa: F401
from .routing.capacity import capacity_keep_mask, expert_capacity  # noqa: F401
from .routing.losses import load_balance_loss, router_z_loss, routing_entropy  # noqa: F401
