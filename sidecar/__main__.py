import signal
import sys

if sys.argv[1:2] == ["run"]:
    # SIGHUP is the reload signal, but its handler is set only once the app is set up: until then its default action
    # would kill the process (a supervisor passes every SIGHUP on to its workers, one still starting among them; it
    # starts them with SIGHUP blocked, for the time until this line). Ignored until the handler replaces this: a
    # starting process reads the current config file anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

from sidecar.cli import main

raise SystemExit(main())
