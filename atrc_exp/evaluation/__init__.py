"""Offline evaluation: SEISM-style edge F-measure (``edge``) and multi-run reports (``report``).

Kept free of torch imports so that edge-evaluation worker processes start quickly.
"""

from __future__ import annotations

__all__ = ["edge", "report"]
