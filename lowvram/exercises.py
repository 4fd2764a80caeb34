"""Self-checks for the exercises: the learner's answer against the value the library computes.

    from lowvram.exercises import check
    check("effektiv batch", 4 * 4, 16)                       # ✅ effektiv batch: 16
    check("LR at step 5", my_lr, scheduler_lr, rtol=1e-6)     # ❌ ... with both values

``check`` prints one verdict line (Azerbaijani, as the notebooks) and returns it, so a solution
notebook can ``assert check(...)`` and a wrong solution fails CI. Numbers, sequences and tensors
are compared with ``atol``/``rtol`` (``math.isclose`` semantics, element by element); anything
else with ``==``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check"]


def _as_list(value: Any) -> list[Any] | None:
    """A flat list of numbers for tensors, arrays and sequences of numbers; None otherwise."""
    if hasattr(value, "detach"):  # a torch.Tensor: compare on the host, as Python floats
        return [float(x) for x in value.detach().cpu().reshape(-1).tolist()]
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):  # numpy
        flat = value.tolist()
        return _as_list(flat) if isinstance(flat, list) else [flat]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        out: list[Any] = []
        for item in value:
            inner = _as_list(item)
            if inner is None:
                return None
            out.extend(inner)
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return None


def _close(got: Any, expected: Any, atol: float, rtol: float) -> bool:
    a, b = _as_list(got), _as_list(expected)
    if a is None or b is None:
        return bool(got == expected)
    if len(a) != len(b):
        return False
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=atol) for x, y in zip(a, b, strict=True))


def _show(value: Any) -> str:
    flat = _as_list(value)
    if flat is not None and len(flat) == 1:
        x = flat[0]
        return f"{x:,}" if isinstance(x, int) else f"{x:.6g}"
    if flat is not None and len(flat) > 6:
        return f"[{', '.join(f'{x:.6g}' for x in flat[:3])}, ... {len(flat)} ədəd]"
    if flat is not None:
        return f"[{', '.join(f'{x:.6g}' for x in flat)}]"
    return str(value)


def check(name: str, got: Any, expected: Any, *, atol: float = 0.0, rtol: float = 0.0) -> bool:
    """Print ``✅ name: value`` when ``got`` matches ``expected`` (within atol/rtol), else ``❌``
    with both values; return the verdict.

    Args:
        name: what is checked, as the learner reads it.
        got: the learner's answer (number, sequence, tensor, or anything comparable with ==).
        expected: what the library computes for the same question.
        atol, rtol: tolerances for numbers, as in ``math.isclose``.
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"check: atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    ok = _close(got, expected, atol, rtol)
    if ok:
        print(f"✅ {name}: {_show(got)}")
    else:
        print(f"❌ {name}: sizin cavab {_show(got)}, gözlənilən {_show(expected)}")
    return ok
