import sys

from lorafusion.cli import main

sys.exit(main())
