"""`python -m adsa_core.engine`: the engine-core process (core.main), as the engine client starts it.

Run through the package rather than as `-m adsa_core.engine.core`: the package imports core (through the
client), so running core itself as __main__ would import it twice and warn on every start."""

import sys

from .core import main

sys.exit(main())
