"""fairseq-moe: sparse Mixture-of-Experts models for fairseq.

Use with ``fairseq-train --user-dir fairseq_moe_plugin`` (the source folder or the installed
package's folder). Importing this package registers the ``moe_*`` models, architectures and
criteria, allow-lists the globals fairseq checkpoints need under torch's weights-only loading,
stops fairseq from dropping the last partial batch, lets it train with several processes on
CPU (``fairseq_fixes``), and teaches its trainer and optimizers about sharded experts
(``expert_parallel_training``).
"""

from .checkpoint_safety import allow_fairseq_checkpoint_globals
from .expert_parallel_training import train_sharded_experts_with_fairseq
from .fairseq_fixes import keep_last_partial_batch, train_with_several_processes_on_cpu

allow_fairseq_checkpoint_globals()
keep_last_partial_batch()
train_with_several_processes_on_cpu()
train_sharded_experts_with_fairseq()

from . import criterions, models, modules, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
