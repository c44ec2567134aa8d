"""``python -m deribit_keeper``: the same as the ``deribit-keeper`` command."""

import sys

from .cli import main

sys.exit(main())
