"""``python -m bench [names...] [--quick] [--device cpu|cuda] [--record]``: see bench/run.py."""

import sys

from bench.run import main

sys.exit(main())
