"""``python -m avseg.analysis <command> ...`` (`avseg.analysis.cli`)."""

import sys

from avseg.analysis.cli import main

sys.exit(main())
