"""The lesson's ``train_accelerate.py`` (Day 25, section 25.3) beside ``lowvram.train.train``::

    from lowvram.lesson import LESSON_SCRIPT, lesson_line, side_by_side
    lesson_line("accelerator.prepare(")     # 38: the line number in the lesson's own script
    print(side_by_side())                   # the six parts, the lesson's lines over ours
    print(script_diff("notebooks/train_accelerate.py", [6]))   # lesson -> corrected, part 6

The script is stored verbatim (``lesson_train_accelerate.txt``, line 1 = ``import torch``), so
line numbers are computed, not typed, and ``train`` can be read against it part by part: both
mark their parts with ``# 1.`` ... ``# 6.`` comments.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["LESSON_SCRIPT", "lesson_line", "parts", "script_diff", "side_by_side"]

LESSON_SCRIPT = (Path(__file__).with_name("lesson_train_accelerate.txt")).read_text(encoding="utf-8")
_PART = re.compile(r"^\s*# (\d)\. ")


def lesson_line(text: str) -> int:
    """The 1-based line number of the first line of the lesson's script that contains ``text``."""
    for number, line in enumerate(LESSON_SCRIPT.splitlines(), start=1):
        if text in line:
            return number
    raise ValueError(f"{text!r} is not in the lesson's train_accelerate.py")


def parts(source: str, first_line: int = 1) -> dict[int, list[tuple[int, str]]]:
    """Split source code at its ``# N. ...`` comments: {N: [(line number, line), ...]}."""
    found: dict[int, list[tuple[int, str]]] = {}
    current = None
    for number, line in enumerate(source.splitlines(), start=first_line):
        match = _PART.match(line)
        if match:
            current = int(match.group(1))
        if current is not None:
            found.setdefault(current, []).append((number, line.rstrip()))
    return found


def side_by_side(function: Callable | None = None) -> str:
    """The lesson's six parts, each followed by the same part of ``function`` (``train``).

    Lines carry their real numbers: the lesson's in its script, ours in ``lowvram/train.py``.
    """
    if function is None:
        from lowvram.train import train as function  # lazily: it imports accelerate

    lines, start = inspect.getsourcelines(function)
    ours = parts("".join(lines), first_line=start)
    lesson = parts(LESSON_SCRIPT)
    out = []
    for part in range(1, 7):
        out.append(f"===== part {part} " + "=" * 60)
        out.append("--- the lesson's train_accelerate.py")
        out += [f"{n:>4}  {text}" for n, text in lesson.get(part, []) if text.strip()]
        out.append(f"--- lowvram/train.py, {function.__name__}()")
        out += [f"{n:>4}  {text}" for n, text in ours.get(part, []) if text.strip()]
    return "\n".join(out)


def script_diff(corrected: str | Path, part_numbers: Iterable[int] = range(1, 8)) -> str:
    """A unified diff, lesson -> ``corrected`` script, of the parts ``part_numbers``.

    Indentation and blank lines are ignored (the corrected script's parts live inside a
    function); ``-`` lines are the lesson's, ``+`` lines the correction's, ``@@`` hunks carry the
    lines' numbers among the compared (non-blank) lines. Raises ValueError for a part either
    script lacks.
    """
    corrected = Path(corrected)
    ours, lesson = parts(corrected.read_text(encoding="utf-8")), parts(LESSON_SCRIPT)
    old: list[str] = []
    new: list[str] = []
    for part in part_numbers:
        if part not in ours or part not in lesson:
            raise ValueError(f"part {part} is not in both the lesson's script and {corrected} "
                             f"(they have parts {sorted(lesson)} and {sorted(ours)})")
        old += [text.strip() for _, text in lesson[part] if text.strip()]
        new += [text.strip() for _, text in ours[part] if text.strip()]
    diff = difflib.unified_diff(old, new, "dərs", "düzəldilmiş", n=0, lineterm="")
    return "\n".join(list(diff)[2:])  # without the two file-name lines
