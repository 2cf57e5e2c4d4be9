"""``python -m tdb_lens ...`` and ``torchrun --nproc_per_node N -m tdb_lens ...``: the ``tdb-lens`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
