"""``python -m gp2p``: the same as the ``gp2p`` command."""
import sys

from gp2p.cli import main

sys.exit(main())
