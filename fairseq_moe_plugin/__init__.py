"""fairseq-moe: sparse Mixture-of-Experts models for fairseq.

Use with ``fairseq-train --user-dir fairseq_moe_plugin`` (the source folder or the installed
package's folder). Importing this package registers the ``moe_*`` models, architectures and
criteria, and allow-lists the globals fairseq checkpoints need under torch's weights-only loading.
"""

from .checkpoint_safety import allow_fairseq_checkpoint_globals

allow_fairseq_checkpoint_globals()

from . import criterions, models, modules, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
