"""`python -m convlens ...` is the `convlens` command."""

import sys

from convlens.main import main

sys.exit(main())
