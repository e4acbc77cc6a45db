"""
What the balancer's and the backend's twistd options share: number
checks and the secret file.
"""

from typing import Callable, Optional

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
