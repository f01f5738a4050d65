"""``python -m conformance.cli``: the same as the ``stage2-conformance`` script."""

import sys

from conformance.cli import main

sys.exit(main())
