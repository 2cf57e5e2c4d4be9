"""The run-time type checker the test suite applies to every annotated function of tdb_lens
(through jaxtyping's import hook, see conftest.py): beartype, with Python's numeric tower
(an int is accepted where a float is annotated)."""

from beartype import BeartypeConf, beartype

typecheck = beartype(conf=BeartypeConf(is_pep484_tower=True))
