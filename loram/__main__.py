import sys

from loram.cli import main

sys.exit(main())
