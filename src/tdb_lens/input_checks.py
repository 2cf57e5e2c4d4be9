"""`validates_input`: marks a public function that checks its own arguments.

Such a function rejects bad input with its own message (naming what was wrong and what was
expected) before it does anything, so that a user sees that message rather than a type checker's.
The mark is read by run-time type checkers (the test suite's, see ``tests/_typecheck.py``): they
check the marked function's parameters *after* it returns, together with its return value, so the
function's own message comes first and input that it wrongly lets through still fails the check.
Outside such a checker the mark changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["validates_input", "VALIDATES_INPUT"]

F = TypeVar("F", bound=Callable[..., object])

#: ``module.qualname`` of every function marked with `validates_input`
VALIDATES_INPUT: set[str] = set()


def validates_input(fn: F) -> F:
    """Mark ``fn`` as checking its own arguments (see the module docstring); returns ``fn`` unchanged."""
    VALIDATES_INPUT.add(f"{fn.__module__}.{fn.__qualname__}")
    return fn
