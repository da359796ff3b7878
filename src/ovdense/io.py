"""Writing files atomically: a reader never sees a half-written output, and nothing is written into the
installed ovdense package."""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parent  # the installed package (src/ovdense in an editable install)


def inside_package(path: str | Path) -> bool:
    """Whether `path` (relative paths against the current directory) lies in the installed ovdense package."""
    resolved = Path(os.path.abspath(Path(path).expanduser())).resolve()
    return resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents


def outside_package(path: str | Path, what: str) -> Path:
    """`path`, refused with an InputError naming `what` (e.g. 'recipe key export') when it is inside the
    installed ovdense package: its shipped files (weights, configs) are never overwritten by a command."""
    if inside_package(path):
        raise InputError(
            f"{what}: {path} is inside the installed ovdense package ({PACKAGE_DIR}); ovdense never writes there, "
            "so that a command cannot overwrite the files it ships. Choose a path outside it (to update the "
            "packaged weights from a source checkout, copy the exported file into src/ovdense/weights/ by hand).")
    return Path(path)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    The file gets the permissions an ordinary write would give it: those of the file it replaces, or
    0666 less the umask for a new one (not mkstemp's 0600). A path inside the installed package is refused.
    """
    path = Path(path)
    outside_package(path, "output file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def prepare_output_dir(path: str | Path, option: str = "--output") -> Path:
    """Create the folder `path` (or accept an existing one) and check that files can be written in it, before any
    work is done; InputError naming `option` when it is a file, unwritable or inside the installed package."""
    path = outside_package(path, option)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is an existing file, not a folder; give a folder for the outputs")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise InputError(f"{option} {path}: cannot write there ({error.strerror or error})") from error
    return path


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """Check, before any work is done, that the file `path` can be written later (its folder is created)."""
    path = outside_package(path, option)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name (e.g. {path / 'results.json'})")
    prepare_output_dir(path.parent, option)
    return path
