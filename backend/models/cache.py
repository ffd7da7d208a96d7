"""Where kvtriton keeps what it downloads and converts (models, wheels, engines).

One place decides the cache root so that the CLI, the builder and the tests agree on it; the
precedence follows the XDG convention so a shared machine can point every user at one cache.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "KVTRITON_CACHE"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root, created if missing.

    Precedence: `override`, then `$KVTRITON_CACHE`, then `$XDG_CACHE_HOME/kvtriton`, then
    `~/.cache/kvtriton`. Empty environment variables count as unset (a common shell accident).
    """
    if override is not None and str(override) != "":
        root = Path(override)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "kvtriton"
    else:
        root = Path.home() / ".cache" / "kvtriton"
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            f"cannot create the kvtriton cache directory {root}: {exc}. "
            f"Pass --cache-dir or set ${CACHE_ENV} to a writable folder."
        ) from exc
    return root
