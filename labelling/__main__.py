"""`python -m labelling`: the command line of :mod:`labelling.cli`."""

import sys

from labelling.cli import main

sys.exit(main())
