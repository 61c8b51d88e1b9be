"""`python -m trl_thr.cli`: the same as the `trl-thr` command."""

import sys

from trl_thr.cli import main

sys.exit(main())
