"""``python -m lowvram.memory``: the memory planner's command line (``lowvram.memory.cli``)."""

from lowvram.memory.cli import run

raise SystemExit(run())
