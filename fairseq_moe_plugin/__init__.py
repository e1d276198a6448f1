"""fairseq-moe: sparse Mixture-of-Experts models for fairseq.

Use with ``fairseq-train --user-dir fairseq_moe_plugin`` (the source folder or the installed
package's folder). Importing this package registers the ``moe_*`` models, architectures and
criteria, allow-lists the globals fairseq checkpoints need under torch's weights-only loading,
stops fairseq from dropping the last partial batch, lets it train with several processes on
CPU (``fairseq_fixes``), teaches its trainer and optimizers about sharded experts
(``expert_parallel_training``), and adds sharded checkpoints, the iterator's global position,
the global-batch balance loss and expert-parallel generation (``distributed/``).
"""

from .checkpoint_safety import allow_fairseq_checkpoint_globals
from .distributed.checkpoint_hooks import save_and_load_sharded_checkpoints_with_fairseq
from .distributed.global_balance import count_balance_over_the_update
from .distributed.inference import generate_with_sharded_experts
from .distributed.iterator_position import record_global_position
from .expert_parallel_training import train_sharded_experts_with_fairseq
from .fairseq_fixes import keep_last_partial_batch, train_with_several_processes_on_cpu

allow_fairseq_checkpoint_globals()
keep_last_partial_batch()
train_with_several_processes_on_cpu()
train_sharded_experts_with_fairseq()
save_and_load_sharded_checkpoints_with_fairseq()
record_global_position()
count_balance_over_the_update()
generate_with_sharded_experts()

from . import criterions, models, modules, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
