"""Checks of recipe values, shared by the recipes of every method.

Each check raises an `InputError` whose message starts with the key it is about ("steps: must be ...");
`within("train.")` prefixes the section, so that a nested mistake reads
"configs/x.yaml: train.steps: must be an integer >= 1, got 0".
"""
from __future__ import annotations

import difflib
import inspect
from contextlib import contextmanager
from typing import Any, Iterable, Mapping

from ..errors import InputError


@contextmanager
def within(prefix: str):
    """Prefix the message of an InputError raised inside (keeping its type) with `prefix`."""
    try:
        yield
    except InputError as error:
        raise type(error)(f"{prefix}{error}") from error


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean `x`?)' when `word` is close to one of `choices`, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return f"the text {value!r}" + (" (YAML reads numbers such as 1e-4 as text: write 1.0e-4)"
                                        if _looks_numeric(value) else "")
    return f"{value!r}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _of_type(key: str, value: Any, kind: type, described: str) -> Any:
    """`value` if it is a `kind`, else an InputError saying what it must be (`described`)."""
    if not isinstance(value, kind):
        raise InputError(f"{key}: must be {described}, got {_shown(value)}")
    return value


def mapping(key: str, value: Any) -> Mapping:
    return _of_type(key, value, Mapping, "a mapping of keys to values")


def sequence(key: str, value: Any) -> list:
    return _of_type(key, value, list, "a list")


def known_keys(values: Mapping, known: Iterable[str], what: str) -> None:
    """Every key of `values` is one of `known`; the first unknown one is an error suggesting the closest."""
    known = list(known)
    for key in values:
        if key not in known:
            raise InputError(f"{key}: unknown key{suggest(key, known)}; {what} has {', '.join(map(str, known))}")


def required(values: Mapping, key: str, what: str) -> Any:
    if values.get(key) is None:
        raise InputError(f"{key}: missing; {what} needs it")
    return values[key]


def integer(key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{key}: must be an integer, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise InputError(f"{key}: must be an integer >= {minimum}, got {value}")
    return value


def number(key: str, value: Any, minimum: float | None = None, maximum: float | None = None,
           positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{key}: must be a number, got {_shown(value)}")
    if positive and value <= 0:
        raise InputError(f"{key}: must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise InputError(f"{key}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{key}: must be <= {maximum}, got {value}")
    return value


def boolean(key: str, value: Any) -> bool:
    return _of_type(key, value, bool, "true or false")


def text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{key}: must be a non-empty string, got {value!r}")
    return value


def choice(key: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise InputError(f"{key}: unknown value {value!r}{suggest(value, choices)}; choose one of {', '.join(choices)}")
    return value


def pair(key: str, value: Any, check, ordered: bool = False) -> tuple:
    """A list of two values, each passing `check(key, item)`; ordered: first <= second."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(f"{key}: must be a list of two values, got {_shown(value)}")
    first, second = (check(f"{key}[{i}]", v) for i, v in enumerate(value))
    if ordered and first > second:
        raise InputError(f"{key}: the first value must not exceed the second, got {list(value)}")
    return first, second


def like_default(key: str, value: Any, default: Any) -> Any:
    """`value` has the type of `default` (bool, int, float, str, or a list of those); None defaults allow anything."""
    if value is None and default is None:
        return value
    if isinstance(default, bool):
        return boolean(key, value)
    if isinstance(default, int):
        return integer(key, value)
    if isinstance(default, float):
        return number(key, value)
    if isinstance(default, str):
        return text(key, value)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)) or (isinstance(default, tuple) and len(value) != len(default)):
            raise InputError(f"{key}: must be a list like {list(default)}, got {_shown(value)}")
        return [like_default(f"{key}[{i}]", v, default[min(i, len(default) - 1)]) if default else v
                for i, v in enumerate(value)]
    return value


def signature_defaults(callable_, exclude: Iterable[str] = ("self",)) -> dict[str, Any]:
    """Keyword arguments of `callable_` and their defaults (inspect.Parameter.empty when required)."""
    exclude = set(exclude)
    return {name: p.default for name, p in inspect.signature(callable_).parameters.items()
            if name not in exclude and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def arguments(values: Any, callable_, what: str, exclude: Iterable[str] = ("self",)) -> dict:
    """`values` as keyword arguments of `callable_`: known names only, each of its default's type."""
    values = mapping(what, values) if values is not None else {}
    defaults = signature_defaults(callable_, exclude)
    with within(f"{what}."):
        known_keys(values, defaults, f"{what} ({getattr(callable_, '__qualname__', callable_)} arguments)")
        for key, value in values.items():
            default = defaults[key]
            if default is not inspect.Parameter.empty:
                like_default(key, value, default)
    return dict(values)
