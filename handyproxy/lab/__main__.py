"""``python -m handyproxy.lab up|cleanup``: keep a lab for manual work, or sweep leftovers."""

import sys

from handyproxy.lab.netns import main

sys.exit(main())
