"""A real dreambatch worker whose model kills a process (SIGKILL, as the OOM killer would) on any prompt
containing "poison": its own, the model process (POISON_KILLS=model, the default), or the worker that
started it as well (POISON_KILLS=worker). Used by the fault tests only; the rest of the worker is untouched
(the model process, spawned with this file as its main module, is patched too)."""

import os
import signal
import sys

from worker.runners.hidream_i1 import HiDreamI1Runner

_generate = HiDreamI1Runner.generate


def generate(self, request, *args, **kwargs):
    if "poison" in request.prompt:
        if os.environ.get("POISON_KILLS") == "worker":
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return _generate(self, request, *args, **kwargs)


HiDreamI1Runner.generate = generate

if __name__ == "__main__":
    from worker.cli import main

    sys.exit(main())
