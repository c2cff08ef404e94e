"""``python -m subcog_crdt``: the ``subcog-crdt`` command line."""

from subcog_crdt.cli import main

if __name__ == "__main__":  # not on a mere import (documentation tools, test collectors)
    raise SystemExit(main())
