"""``python -m gateway`` is the ``gateway`` command."""

import sys

from gateway.cli import main

__all__ = ["main"]

sys.exit(main())
