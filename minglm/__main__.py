"""``python -m minglm``: see minglm/cli.py."""

import sys

from minglm.cli import main

sys.exit(main())
