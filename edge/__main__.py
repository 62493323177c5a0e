import sys

from edge.server.cli import main

sys.exit(main())
