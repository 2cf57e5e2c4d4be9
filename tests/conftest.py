"""Settings for the whole test session."""

import os

# Tests that call the `tdb-lens` command in-process would otherwise switch glibc to keeping freed
# memory (tdb_lens.allocator) for the rest of the pytest process; the tests of that mode run it in
# their own interpreters.
os.environ.setdefault("TDB_LENS_KEEP_FREED_MEMORY", "0")
