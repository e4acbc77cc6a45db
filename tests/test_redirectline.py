"""
The redirect answer line: what the listener writes is what clients read.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistedcluster.wire.redirectline import (
    MAX_ANSWER_LENGTH,
    NO_BACKEND,
    NO_BACKEND_CODE,
    ErrorAnswer,
    answerLine,
    errorLine,
    hostPortText,
    parseLine,
)


def test_the_exact_bytes():
    assert answerLine("127.0.0.1", 9001) == b"127.0.0.1 9001\r\n"
    assert answerLine("::1", 9001) == b"::1 9001\r\n"
    assert NO_BACKEND == errorLine(NO_BACKEND_CODE) == b"ERROR no-backend\r\n"
    assert hostPortText("::1", 9001) == "::1 9001"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "10.1.2.3", "::1", "2001:db8::7", "fe80::1", "web-1.example.org"]
)
@pytest.mark.parametrize("port", [1, 80, 9001, 65535])
def test_an_answer_round_trips(host, port):
    line = answerLine(host, port)
    assert parseLine(line) == (host, port)
    assert parseLine(line[:-2]) == (host, port)  # without its line end


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(1, 65535),
)
def test_any_ip_address_round_trips(host, port):
    assert parseLine(answerLine(host, port)) == (host, port)


def test_no_backend_round_trips():
    with pytest.raises(ErrorAnswer) as caught:
        parseLine(NO_BACKEND)
    assert caught.value.code == NO_BACKEND_CODE
    assert str(caught.value) == "ERROR no-backend"


def test_other_error_codes_round_trip():
    with pytest.raises(ErrorAnswer) as caught:
        parseLine(errorLine("overloaded"))
    assert caught.value.code == "overloaded"


@pytest.mark.parametrize(
    "host", ["127.0.0.1 1\r\nEVIL", "a b", "", "h\x00", "[::1]"]
)
def test_an_answer_never_carries_a_host_that_is_not_one(host):
    with pytest.raises(ValueError):
        answerLine(host, 1)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"127.0.0.1\r\n",
        b"127.0.0.1  80\r\n",
        b"127.0.0.1 0\r\n",
        b"127.0.0.1 65536\r\n",
        b"127.0.0.1 http\r\n",
        b"ERROR\r\n",
        b"ERROR a b\r\n",
        b"\xff 80\r\n",
        b"1" * (MAX_ANSWER_LENGTH + 1),
    ],
)
def test_anything_else_is_a_value_error(line):
    with pytest.raises(ValueError):
        parseLine(line)
