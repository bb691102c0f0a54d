"""Library errors shown as one line: the clients cmce calls (torch, arrow, MLflow, faiss) raise messages that run
to several lines, sometimes a server's whole reply or a C++ stack."""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 300) -> str:
    """The line that says what went wrong (the first), cut to `limit` characters; the type when it is empty."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def last_line(err: BaseException, limit: int = 300) -> str:
    """faiss puts its stack first and the reason last."""
    lines = str(err).strip().splitlines()
    return lines[-1][:limit] if lines else type(err).__name__
