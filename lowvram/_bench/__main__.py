"""``python -m lowvram._bench``: the benchmark's command line (``lowvram._bench.cli``)."""

import sys

from lowvram._bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
