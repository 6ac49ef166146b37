"""``python -m merge3``: Python puts the current folder first on ``sys.path`` for ``-m``; merge3 takes it off, so an
objective named in a config (``module:function``) is never imported from whatever folder the command runs in."""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.pop(0)

from merge3.cli import main  # noqa: E402

sys.exit(main())
