"""Moved to `tdb_lens.corpus` (explain and sae both read text through it).

This name stays for existing imports and is the same module object, so
``import tdb_lens.explain.corpus as C`` reads and patches the module that does the work.
"""

import sys

from .. import corpus as _corpus
from ..corpus import (  # noqa: F401  (re-exported)
    DEBIAN_CORPUS_DIRS,
    DEBIAN_CORPUS_PACKAGE,
    Corpus,
    CorpusUnavailableError,
    build_corpus,
    default_corpus_path,
    iter_texts,
)

sys.modules[__name__] = _corpus
