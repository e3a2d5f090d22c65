"""``python -m fastseq``: the same command line as the ``fastseq`` console script."""

import sys

from fastseq.cli import main

sys.exit(main())
