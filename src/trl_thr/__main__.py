import sys

from trl_thr.cli import main

sys.exit(main())
