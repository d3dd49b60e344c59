"""``python -m torchdebug`` runs the ``torchdebug`` command."""

import sys

from torchdebug.cli import main

sys.exit(main())
