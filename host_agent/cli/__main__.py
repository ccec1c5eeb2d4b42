"""`python -m vmwipe.host_agent.cli`: the same as the `vmwipe` console script."""

import sys

from .agent import main

sys.exit(main())
