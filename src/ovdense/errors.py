"""The errors ovdense raises for problems with what a user gave it; the CLI prints each as one `error:` line.

InputError: the data, a file or a setting is unusable (CLI exit code 1); it names the file or option.
UsageError: an option value is nonsense, e.g. `--batch-size 0` (CLI exit code 2, like argparse's own).
CheckpointError: a weights or training-state file is missing, empty, damaged or of the wrong kind.
"""
from __future__ import annotations


class InputError(ValueError):
    """Unusable input (image, dataset, checkpoint, recipe, output path); the message names it and says why."""


class UsageError(InputError):
    """A command-line option or argument value that cannot work; the message names the option."""


class CheckpointError(InputError):
    """A checkpoint or training-state file that cannot be read as what it should be."""
