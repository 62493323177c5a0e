"""`python -m edge`: the command line (edge/server/cli.py)."""

import signal
import sys

# A SIGHUP (reload) that reaches `edge run` or a worker while it starts waits, blocked,
# until the process has its handler (each unblocks it then) instead of ending it.
if sys.argv[1:2] in (["run"], ["worker"]):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

from edge.server.cli import main

sys.exit(main())
