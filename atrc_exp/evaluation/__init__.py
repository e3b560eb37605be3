"""Offline evaluation: SEISM-style edge F-measure (``edge``), multi-run reports (``report``) and
a sweep's objective (``objective``); importing the package imports none of them."""
