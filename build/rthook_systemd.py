"""PyInstaller runtime hook: run before server.py inside the onefile executable.

A onefile executable is two processes: the bootloader (the one systemd started,
so the service's main PID) unpacks the bundle and runs Python as its child,
forwarding signals to it and exiting with its exit code. systemd sets
WATCHDOG_PID to the main PID, and server.py only pings the watchdog when
WATCHDOG_PID is its own PID; hand the watchdog over to the Python child here.
(The unit needs NotifyAccess=all for the same reason: READY=1, WATCHDOG=1 and
STOPPING=1 come from the child, not from the main PID.)
"""

import os

if os.environ.get("WATCHDOG_PID") == str(os.getppid()):
    os.environ["WATCHDOG_PID"] = str(os.getpid())
