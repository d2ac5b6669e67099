"""``python -m minglm``: the command line, dispatched by minglm/commands/__init__.py."""

import sys

from minglm.commands import main

sys.exit(main())
