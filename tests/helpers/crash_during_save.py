"""fairseq-train, except that rank 1 dies while it writes its shards of the sharded save at the
update given first: ``torchrun ... tests/helpers/crash_during_save.py UPDATE <fairseq-train args>``.
It writes a few bytes of its data file and exits, as a killed process would leave it."""

import os
import sys
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter

CRASH_AT = int(sys.argv.pop(1))
write_data = FileSystemWriter.write_data


def dying_write_data(self, plan, planner):
    if os.environ.get("RANK") == "1" and Path(self.path).name.startswith(f"u{CRASH_AT}-"):
        (Path(self.path) / "__1_0.distcp").write_bytes(b"partial")
        os._exit(3)
    return write_data(self, plan, planner)


FileSystemWriter.write_data = dying_write_data

if __name__ == "__main__":
    from fairseq_cli.train import cli_main

    cli_main()
