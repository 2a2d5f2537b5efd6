import sys

from vaepipe.cli import main

sys.exit(main())
