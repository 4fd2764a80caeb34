"""``python -m lowvram._bench``: the benchmark's command line (see ``lowvram._bench``)."""

import sys

from lowvram._bench import main

if __name__ == "__main__":
    sys.exit(main())
