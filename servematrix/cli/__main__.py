"""`python -m servematrix.cli ...`: the same as the `servematrix` script."""

import sys

from servematrix.cli import main

sys.exit(main())
