"""fairseq-moe: sparse Mixture-of-Experts models for fairseq.

Use with ``fairseq-train --user-dir fairseq_moe_plugin`` (the source folder or the installed
package's folder). Importing this package registers the ``moe_*`` models, architectures and
criteria, allow-lists the globals fairseq checkpoints need under torch's weights-only loading,
and stops fairseq from dropping the last partial batch (``fairseq_fixes``).
"""

from .checkpoint_safety import allow_fairseq_checkpoint_globals
from .fairseq_fixes import keep_last_partial_batch

allow_fairseq_checkpoint_globals()
keep_last_partial_batch()

from . import criterions, models, modules, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
