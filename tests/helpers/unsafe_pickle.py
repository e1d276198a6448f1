"""A pickle exploit for the checkpoint-safety tests (tests/test_checkpoint_safety.py and the
sharded checkpoints' metadata in tests/distributed/test_sharded_checkpoints.py)."""

import os


class RunsCode:
    """Unpickling this would call os.system (a classic pickle exploit)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
