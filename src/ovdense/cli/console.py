"""What a command prints besides its results: one `error:` line per failure, and ovdense's log messages."""
from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager

logger = logging.getLogger("ovdense")


def print_error(message) -> None:
    """One `error:` line (continuation lines of a long message are indented under it)."""
    lines = str(message).strip().splitlines() or ["unknown error"]
    print("error: " + "\n  ".join(lines), file=sys.stderr)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tqdm and test harnesses replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@contextmanager
def command_logging(verbosity: int):
    """For one command: ovdense's messages at WARNING (-q: ERROR, -v: INFO) as 'LEVEL: message' lines; other
    libraries' logs and warnings only with -vv. The previous logging and warning settings come back after."""
    root, hub = logging.getLogger(), logging.getLogger("huggingface_hub")
    saved = (logger.handlers[:], logger.level, logger.propagate, root.level, hub.level)
    logger.handlers[:] = [_StderrHandler()]
    logger.handlers[0].setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.setLevel(logging.ERROR if verbosity < 0 else logging.WARNING if verbosity == 0 else logging.INFO)
    logger.propagate = False
    root.setLevel(logging.INFO if verbosity > 1 else logging.CRITICAL)  # open_clip logs to the root logger
    hub.setLevel(logging.INFO if verbosity > 1 else logging.CRITICAL)  # download retries; our error says it all
    with warnings.catch_warnings():
        if verbosity < 2:
            warnings.filterwarnings("ignore", module=r"(open_clip|torch|torchvision|timm|huggingface_hub)(\.|$)")
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            logger.handlers[:], logger.level, logger.propagate = saved[:3]
            root.setLevel(saved[3])
            hub.setLevel(saved[4])
