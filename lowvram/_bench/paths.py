"""Where ``lowvram._bench`` finds the repository (README, notebooks), for every part of it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO"]

REPO = Path(__file__).resolve().parents[2]  # lowvram/_bench/paths.py -> the repository
