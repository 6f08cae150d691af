"""`python -m recalibration.run`, but dying like kill -9 at a chosen point (test-only).

    python tests/helpers/crashing_run.py after-save N  <recalibration.run args>   # right after checkpoint N is complete
    python tests/helpers/crashing_run.py in-save N     <recalibration.run args>   # checkpoint N staged, not yet renamed

The hooks live here, not in the shipped trainer: they patch the two moments the
resume tests need, the checkpoint callback and the atomic rename.
"""

import os
import sys

from recalibration import run, trainer

where, step = sys.argv[1], int(sys.argv[2])
if where == "after-save":
    def on_save(self, args, state, control, **kw):
        if state.global_step == step:
            os._exit(137)

    trainer.ProgressLog.on_save = on_save
elif where == "in-save":
    rename = os.replace

    def replace(src, dst, *a, **kw):
        if trainer.STAGING in str(src) and str(src).endswith(f"checkpoint-{step}"):
            os._exit(137)  # the staging copy is complete; the rename never happens
        return rename(src, dst, *a, **kw)

    trainer.os.replace = replace
else:
    raise SystemExit(f"unknown crash point {where!r}")
sys.exit(run.main(sys.argv[3:]))
