import sys

from mplb.cli import main

sys.exit(main())
