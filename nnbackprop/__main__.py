import sys

from nnbackprop.cli import main

sys.exit(main())
