"""
Shared fixtures: fail any test whose code logged an error or a traceback, so
nothing is swallowed (the magic-wormhole habit).
"""

import pytest
from twisted.logger import LogLevel, globalLogPublisher


@pytest.fixture(autouse=True)
def observeErrors(request):
    errors = []

    def observer(event):
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get(
            "log_failure"
        ):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(observer)
    if errors and not request.node.get_closest_marker("allow_errors"):
        from twisted.logger import formatEvent

        texts = []
        for e in errors:
            text = formatEvent(e)
            if e.get("log_failure") is not None:
                text += "\n" + e["log_failure"].getTraceback()
            texts.append(text)
        pytest.fail("logged errors:\n" + "\n".join(texts))


@pytest.fixture
def logged():
    """
    Every log event emitted during the test, as formatted text.
    """
    from twisted.logger import formatEvent

    events = []

    def observer(event):
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)
