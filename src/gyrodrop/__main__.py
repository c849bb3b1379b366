"""``python -m gyrodrop``: the experiment command line (see ``gyrodrop --help``)."""

import sys

from gyrodrop.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
