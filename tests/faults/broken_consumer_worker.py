"""A real dreambatch worker whose Celery consumer loop, the first time it runs, fails the way a broker
crash made it fail in the field (AttributeError from the connection-loss path), so Celery stops with
"Unrecoverable error". A marker file (argv[1]) makes it happen once: the restarted worker runs normally;
"always" makes it happen on every start. Used by the fault tests only."""

import sys
import time
from pathlib import Path

from celery.worker import loops

marker_arg = sys.argv.pop(1)
marker = Path(marker_arg)
_asynloop = loops.asynloop


def asynloop(*args, **kwargs):
    if marker_arg == "always" or not marker.exists():
        if marker_arg != "always":
            marker.write_text("crashed once")
        time.sleep(1)
        raise AttributeError("'NoneType' object has no attribute 'hostname'")
    return _asynloop(*args, **kwargs)


loops.asynloop = asynloop

if __name__ == "__main__":
    from worker.cli import main

    sys.exit(main())
