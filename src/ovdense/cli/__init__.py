"""Command line: ovdense demo | serve | segment | detect | ground | pseudo-label | export | eval | synth | train |
convert | models.

One module per command (`add_parser` builds its sub-parser, `run` does it); the option groups they share are in
options.py, the predictors those options describe in build.py, the image inputs and their outputs in inputs.py,
error lines and logging in console.py, and main.py only parses and dispatches. torch and open_clip are imported
inside the commands, so `ovdense --help` answers at once. Every failure is one `error:` line on stderr, never a
traceback (unless -v): exit code 1 for data and runtime errors, 2 for usage.
"""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
