"""The inputs of the image commands (segment, detect, ground): the vocabulary, the images that files, folders and
globs name, an output stem for each, and the loop that runs a command over them."""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from ..errors import InputError, UsageError
from .console import print_error


def vocabulary(args):
    """The Vocabulary of --classes or --classes-file (exactly one of them)."""
    classes_file = getattr(args, "classes_file", None)
    if bool(args.classes) == bool(classes_file):  # checked before the import below loads torch
        raise UsageError("give the classes with exactly one of --classes 'cat, dog; puppy' or --classes-file FILE")
    from ..text import Vocabulary
    if classes_file:
        return Vocabulary.from_file(classes_file)
    try:
        return Vocabulary.parse(args.classes)
    except ValueError as error:  # a bad --classes value is a usage error; a bad file's content a data error
        raise UsageError(f"--classes: {error}") from error


def expand_inputs(patterns: list[str], exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """Image paths from files, folders (their images, not recursive) and globs ('photos/**/*.jpg'), in order,
    each file once; and a message for each pattern that gave none. Files under `exclude` (the output folder)
    are skipped."""
    from ..data.datasets import IMAGE_SUFFIXES
    found, unmatched = [], []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists() or not glob.has_magic(pattern):
            matches = [path]  # a missing plain path is reported when it is read
        else:
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))
                       if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES]
        kept = [p for p in matches if exclude is None or exclude.resolve() not in p.resolve().parents]
        if not kept:
            unmatched.append(f"{pattern}: no image found there" if not matches else
                             f"{pattern}: only files inside --output {exclude}, which are never read as inputs")
        found += kept
    unique = {p.resolve(): p for p in reversed(found)}  # one file named twice (relative, absolute) runs once
    return [p for p in found if unique.get(p.resolve()) is p], unmatched


def output_stems(paths: list[Path]) -> list[str]:
    """Output file stems, all distinct (ignoring letter case): each image's own stem, or, when two images share one
    (a/x.jpg, b/x.jpg), their paths relative to their common folder ('a__x', 'b__x'), numbered where even those
    are equal ('a__x', 'a__x-2' for a/x.jpg and a/x.png)."""
    stems = [p.stem for p in paths]
    if len({s.lower() for s in stems}) < len(stems):
        root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
        relative = [p.resolve().relative_to(root) for p in paths]
        stems = [str(r.with_suffix("")).replace(os.sep, "__") for r in relative]
    taken: set[str] = set()  # still equal (a/x.png beside a__x.png or a/x.jpg; letter case): numbered
    for i, stem in enumerate(stems):
        unique, n = stem, 1
        while unique.lower() in taken:
            n += 1
            unique = f"{stem}-{n}"
        taken.add(unique.lower())
        stems[i] = unique
    return stems


def images(args) -> tuple:
    """(output folder, the input images, how many inputs matched none); each input that matched nothing is
    reported."""
    from ..io import prepare_output_dir
    out_dir = prepare_output_dir(args.output)
    paths, unmatched = expand_inputs(args.images, exclude=out_dir)
    for message in unmatched:
        print_error(message)
    return out_dir, paths, len(unmatched)


def each_image(paths: list[Path], failed: int, out_dir: Path, desc: str, quiet: bool, work) -> int:
    """Run work(path, stem) -> a line to print over every input with a progress bar; an image that fails (bad input,
    out of memory) is reported and the others go on. failed: inputs that already failed. Returns the exit code."""
    import torch
    from tqdm import tqdm
    failures = failed
    for path, stem in tqdm(list(zip(paths, output_stems(paths))), desc=desc, unit="img",
                           disable=True if quiet or len(paths) < 2 else None):  # None: on a terminal only
        try:
            line = work(path, stem)
        except (InputError, MemoryError, torch.OutOfMemoryError) as error:  # this image fails; the others go on
            failures += 1
            reason = str(error) if isinstance(error, InputError) else f"{path}: out of memory ({error})"
            tqdm.write(f"error: {reason}", file=sys.stderr)
            continue
        tqdm.write(line)
    if failures and len(paths) + failed > 1:
        print(f"{failures} of {len(paths) + failed} inputs failed (see above); the others are in {out_dir}",
              file=sys.stderr)
    return 1 if failures else 0


def check_threshold(threshold: float) -> None:
    if not 0 <= threshold < 1:
        raise UsageError(f"--threshold must be in [0, 1), got {threshold}")
