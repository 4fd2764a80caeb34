"""One of :func:`lowvram.memory.plan`'s recording processes (``workers``): runs the plan's
search for some recipes and writes the steps it recorded for the parent's memo.

``python -m lowvram.memory._plan_worker TASK.pkl OUT.pkl``: TASK is the pickled arguments of
``plan._search_recordings``; OUT receives its pickled result. Private: plan() starts it.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from lowvram.memory.plan import _search_recordings

    task_path, out_path = (Path(a) for a in argv)
    task = pickle.loads(task_path.read_bytes())
    out_path.write_bytes(pickle.dumps(_search_recordings(*task)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
