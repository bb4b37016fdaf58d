import sys

from fastmbv1.cli import main

sys.exit(main())
