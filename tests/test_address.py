import pytest

from twistedcluster.address import formatHostPort, parseHostPort


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("backend.example:80", ("backend.example", 80)),
        ("[::1]:9000", ("::1", 9000)),
        (" [fe80::1]:1 ", ("fe80::1", 1)),
    ],
)
def test_parse_and_format_round_trip(text, expected):
    assert parseHostPort(text) == expected
    assert parseHostPort(formatHostPort(*expected)) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("9000", "not HOST:PORT"),
        (":9000", "no host"),
        ("h:http", "not a number"),
        ("h:0", "1..65535"),
        ("h:70000", "1..65535"),
        ("::1:9000", "IPv6"),
        ("[::1]9000", r"not \[IPV6\]:PORT"),
        ("bad host:9000", "not an IP address or a host name"),
        ("evil\r\nEVIL:9000", "not an IP address or a host name"),
    ],
)
def test_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parseHostPort(text)


def test_log_phrases_for_backends_and_errors():
    """
    Log lines name a backend once when its name is its address, and put
    Twisted's error sentences inside a line without their full stop.
    """
    from twisted.internet import error
    from twisted.python.failure import Failure

    from twistedcluster.address import backendText, errorText

    assert backendText("127.0.0.1:6392", "127.0.0.1", 6392) == "127.0.0.1:6392"
    assert backendText("web1", "127.0.0.1", 6392) == "web1 at 127.0.0.1:6392"
    assert backendText("v6", "::1", 80) == "v6 at [::1]:80"
    refused = error.ConnectionRefusedError("111: Connection refused")
    assert errorText(refused) == errorText(Failure(refused)) == "connection refused"
    assert errorText(error.TCPTimedOutError()) == "connection timed out"
    assert errorText(OSError("No route to host.")) == "No route to host"
