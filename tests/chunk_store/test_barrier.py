"""The stages' barrier waits as long as the slowest rank works, past the process group's timeout
(issue 24: gloo's barrier gives up after 30 minutes, while a rank alone plans a big corpus or
works through a long share, and the stage dies).

The timeout is shortened to 2 s here (the module global torch reads for a group made without
one), and one rank works 6 s between two barriers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = '''
import datetime, sys, time
import torch.distributed.distributed_c10d as c10d
c10d.default_pg_timeout = datetime.timedelta(seconds=2)  # gloo's 30 minutes, at the test's scale
from chunk_store.framework import runtime
runtime.barrier()
if runtime.rank() == 1:
    time.sleep(6)  # a long unit of work while rank 0 waits
runtime.barrier()
runtime.barrier()
print(f"rank {runtime.rank()} of {runtime.world_size()} passed", flush=True)
'''


def test_a_barrier_outlasts_the_process_group_timeout(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(line for line in out.stdout.splitlines() if "passed" in line) == \
        ["rank 0 of 2 passed", "rank 1 of 2 passed"]
