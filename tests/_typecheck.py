"""The run-time type checker the test suite applies to every annotated function of tdb_lens
(through jaxtyping's import hook, see conftest.py): beartype, with Python's numeric tower
(an int is accepted where a float is annotated).

Functions marked `tdb_lens.input_checks.validates_input` check their own arguments with messages
the tests pin. jaxtyping checks a function's parameters with one generated function before the
call and parameters + return value with a second one after it (the second takes the return
value as an extra keyword argument, ``ret0``). For a marked function the first check is skipped:
its own validation speaks first, and whatever it lets through is still checked, after the call,
by the second. (The import hook applies its decorator innermost, before the mark is made, so the
mark is read when the check runs.)
"""

import inspect
import sys
from collections.abc import Callable
from typing import Any

from beartype import BeartypeConf, beartype

_beartype = beartype(conf=BeartypeConf(is_pep484_tower=True))


def _marked(name: str) -> bool:
    # read from sys.modules: importing tdb_lens here would import it before the import hook is in place
    return name in getattr(sys.modules.get("tdb_lens.input_checks"), "VALIDATES_INPUT", ())


def typecheck(fn: Callable[..., Any]) -> Callable[..., Any]:
    checked = _beartype(fn)
    if checked is fn or "ret0" in inspect.signature(fn).parameters:
        return checked
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"

    def check_parameters(*args: Any, **kwargs: Any) -> Any:
        return None if _marked(name) else checked(*args, **kwargs)

    return check_parameters
