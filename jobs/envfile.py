"""`.env`: read into the environment once, before anything reads a variable (jobs.settings' `get_settings()`, and
the console script before it parses options that fall back on variables, such as `submit --api`'s
DREAMBATCH_API_URL). Standard library and python-dotenv only: the console script imports it first."""

from __future__ import annotations

import os
from pathlib import Path

ENV_FILE = ".env"  # read by get_settings() from the current directory, when there is one


def load_env_file() -> Path | None:
    """Put the variables of `.env` (or DREAMBATCH_ENV_FILE's file) that the environment does not set into it;
    returns the file read, or None."""
    name = os.environ.get("DREAMBATCH_ENV_FILE", ENV_FILE)
    path = Path(name).expanduser() if name else None
    if path is None or not path.is_file():
        return None
    from dotenv import load_dotenv

    load_dotenv(path, override=False)
    return path
