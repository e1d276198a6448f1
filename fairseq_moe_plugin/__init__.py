"""fairseq-moe: sparse Mixture-of-Experts models for fairseq.

Use with ``fairseq-train --user-dir fairseq_moe_plugin`` (the source folder or the installed
package's folder). Importing this package registers the ``moe_*`` models, architectures and
criteria, allow-lists the globals fairseq checkpoints need under torch's weights-only loading, and
applies the plugin's changes to fairseq, every one listed in ``fairseq_patches.PATCHES`` (what
it changes, why, the fairseq versions it was checked on, whether dense runs change;
``list_patches()`` says which are applied): it stops fairseq from dropping the last partial
batch, lets it train with several processes on CPU (``fairseq_fixes``), teaches its trainer and
optimizers about sharded experts (``expert_parallel_training``), keeps the criterion's balance
boost in checkpoints (``criterions/criterion_state.py``), and adds sharded checkpoints, the
iterator's global position, the global-batch balance loss and expert-parallel generation
(``distributed/``).
"""

from .checkpoint_safety import allow_fairseq_checkpoint_globals
from .fairseq_patches import apply_patches, list_patches  # noqa: F401  (public)

allow_fairseq_checkpoint_globals()
apply_patches()

from . import criterions, models, modules, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
