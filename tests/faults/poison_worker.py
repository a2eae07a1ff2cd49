"""A real dreambatch worker whose model kills its own process (SIGKILL, as the OOM killer would) on
any prompt containing "poison". Used by the fault tests only; the rest of the worker is untouched."""

import os
import signal
import sys

from worker.runners.hidream_i1 import HiDreamI1Runner

_generate = HiDreamI1Runner.generate


def generate(self, request, *args, **kwargs):
    if "poison" in request.prompt:
        os.kill(os.getpid(), signal.SIGKILL)
    return _generate(self, request, *args, **kwargs)


HiDreamI1Runner.generate = generate

if __name__ == "__main__":
    from worker.cli import main

    sys.exit(main())
