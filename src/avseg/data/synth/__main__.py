"""`python -m avseg.data.synth`: see avseg.data.synth.cli."""

import sys

from avseg.data.synth.cli import main

sys.exit(main())
