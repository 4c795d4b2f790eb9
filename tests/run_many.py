"""Run several ``trainer run`` commands one after another in the processes of one launch (test helper).

    accelerate launch ... tests/run_many.py RUNS.json     # RUNS.json: a list of argument lists

Each run ends with ``accelerator.end_training()``, which destroys the process group; a second rendezvous in
the same processes is not possible under the launcher, so here the group is kept for the next run. The
Accelerator state (mixed precision) is reset between runs, the process state (the group) is not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate.state import AcceleratorState, PartialState  # noqa: E402

from trainer.cli import main  # noqa: E402

PartialState.destroy_process_group = lambda self, group=None: None

for args in json.loads(Path(sys.argv[1]).read_text()):
    code = main(["run", *args])
    if code:
        sys.exit(code)
    AcceleratorState._reset_state(reset_partial_state=False)
