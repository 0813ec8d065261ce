"""``python -m gradwise``: see ``gradwise._cli``."""

import sys

from gradwise._cli import main

sys.exit(main())
