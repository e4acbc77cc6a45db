"""
What the balancer's and the backend's twistd options share: number
checks and the secret file.
"""

from typing import Callable, Dict, Iterable, Optional, Sequence

from twisted.python import usage


def positive(kind: Callable) -> Callable:
    """
    An option coercer: C{kind(value)}, which must be > 0.
    """

    def convert(value):
        v = kind(value)
        if not v > 0:
            raise ValueError(f"must be > 0, not {value}")
        return v

    convert.coerceDoc = "Must be > 0."
    return convert


def oneLineDoc(method: Callable) -> Callable:
    """
    An C{opt_} method whose docstring twistd's --help shows as flowing text:
    it prints a docstring's line breaks and indentation as they are
    ("kept in the         pool").
    """
    method.__doc__ = " ".join((method.__doc__ or "").split())
    return method


def loadSecretOption(path: Optional[str]) -> Optional[bytes]:
    """
    The secret in C{--secret-file PATH}, or C{None} without one; a
    L{usage.UsageError} that says what is wrong with the file.
    """
    if path is None:
        return None
    from twistedcluster.wire.auth import SecretFileError, loadSecret

    try:
        return loadSecret(path)
    except SecretFileError as e:
        raise usage.UsageError(str(e)) from None


def keyValues(items: Iterable[str], keys: Sequence[str]) -> Dict[str, str]:
    """
    The C{KEY=VALUE} items of a comma-separated option value, as a dict
    (keys and values stripped); C{ValueError} naming an item that is not
    one, an unknown key, or a key given twice.  The one reader of such
    lists, so that every option says the same about the same mistake.
    """
    pairs: Dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"{item!r} is not KEY=VALUE (keys: {', '.join(keys)})")
        if key not in keys:
            raise ValueError(f"unknown key {key!r} (keys: {', '.join(keys)})")
        if key in pairs:
            raise ValueError(f"{key} given twice")
        pairs[key] = value
    return pairs
