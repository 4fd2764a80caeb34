"""``python -m lowvram.verify``: the check's command line (``lowvram.verify.cli``)."""

from lowvram.verify.cli import main

raise SystemExit(main())
