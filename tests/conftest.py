"""Settings for the whole test session."""

import os

# Tests that call the `tdb-lens` command in-process would otherwise switch glibc to keeping freed
# memory (tdb_lens.allocator) for the rest of the pytest process; the tests of that mode run it in
# their own interpreters.
os.environ.setdefault("TDB_LENS_KEEP_FREED_MEMORY", "0")

# Every activation of every test run is checked against the layout its hook point declares
# (shape against the named axes, floating dtype): a model whose code disagrees with its own
# declared layouts fails at the hook, named.
from tdb_lens.hooks.hook_point import set_layout_checks

set_layout_checks(True)
