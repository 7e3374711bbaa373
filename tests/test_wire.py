"""The pure wire layer: recorded responses in tests/samples/, request validation, Retry-After."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autocalls_async as sdk
from autocalls_async import APIError, InvalidRequestError, Reply
from autocalls_async import _wire as wire
from autocalls_async._wire import (
    build_request,
    check_base_url,
    check_token,
    excerpt,
    parse_reply,
    retry_after,
)

SAMPLES = sorted((Path(__file__).parent / "samples").glob("*.json"))
NOW = 1_796_000_000.0


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_recorded_sample(path: Path) -> None:
    """Each recorded response parses into the documented Reply or the documented error."""
    sample = load(path)
    expect = sample["expect"]
    body = sample["body"].encode()

    def parse() -> Reply:
        return parse_reply(
            sample["status"],
            sample["headers"],
            body,
            customer_identifier="+14155551234",
            now=NOW,
        )

    if "reply" in expect:
        reply = parse()
        for name, value in expect["reply"].items():
            if name == "function_calls":
                got = [{"name": c.name, "arguments": c.arguments} for c in reply.function_calls]
                assert got == value
            elif name == "raw_has":
                assert value in reply.raw
            else:
                assert getattr(reply, name) == value
        return
    with pytest.raises(APIError) as caught:
        parse()
    error = caught.value
    assert type(error) is getattr(sdk, expect["error"])
    assert error.status == expect["status"]
    assert error.error_code == expect.get("error_code")
    text = str(error)
    assert text.startswith(f"HTTP {expect['status']}")
    assert "\n" not in text
    assert len(text) <= expect.get("max_len", 400)
    if "message" in expect:
        assert error.message == expect["message"]
    if "message_contains" in expect:
        assert expect["message_contains"] in text
    if "retry_after" in expect:
        assert error.retry_after == expect["retry_after"]
    if "errors" in expect:
        assert isinstance(error, sdk.UnprocessableEntityError)
        assert error.errors == expect["errors"]


def test_validation_failure_keeps_cattrs_detail_and_cause() -> None:
    """A mistyped reply says which field, and chains the converter's own error."""
    body = json.dumps({"success": True, "conversation_id": 7, "reply": "x"}).encode()
    with pytest.raises(sdk.APIResponseValidationError, match=r"conversation_id") as caught:
        parse_reply(200, {}, body, customer_identifier="c", now=NOW)
    assert caught.value.__cause__ is not None


GOOD = {"assistant_id": 123, "customer_identifier": "+14155551234", "message": "Hi"}
BAD_INPUTS = [
    ({"assistant_id": "123"}, "assistant_id must be an int.*int\\(...\\)"),
    ({"assistant_id": True}, "assistant_id must be an int, got bool"),
    ({"assistant_id": 0}, "positive"),
    ({"assistant_id": -5}, "positive"),
    ({"assistant_id": 2**64}, "positive"),
    ({"assistant_id": 1.0}, "must be an int"),
    ({"assistant_id": None}, "must be an int"),
    ({"customer_identifier": ""}, "customer_identifier is empty"),
    ({"customer_identifier": "   "}, "customer_identifier is empty"),
    ({"customer_identifier": "x" * 256}, "256 characters.*at most 255"),
    ({"customer_identifier": 4155551234}, "customer_identifier must be a str"),
    ({"customer_identifier": "a\ud800"}, "lone surrogate"),
    ({"message": ""}, "message is empty"),
    ({"message": " \n\t"}, "message is empty"),
    ({"message": b"Hi"}, "message must be a str"),
    ({"variables": ["a"]}, "variables must be a dict"),
    ({"variables": {"x": math.nan}}, "JSON cannot represent"),
    ({"variables": {"x": math.inf}}, "JSON cannot represent"),
    ({"variables": {"when": datetime(2026, 1, 1, tzinfo=UTC)}}, "datetime.*isoformat"),
    ({"variables": {1: "a"}}, "keys must be str"),
    ({"variables": {"s": {1, 2}}}, "set, which is not JSON"),
    (
        {
            "variables": {
                "deep": [
                    [
                        [
                            [
                                [
                                    [
                                        [
                                            [
                                                [
                                                    [
                                                        [
                                                            [
                                                                [
                                                                    [
                                                                        [
                                                                            [
                                                                                [
                                                                                    [
                                                                                        [
                                                                                            [
                                                                                                [
                                                                                                    [
                                                                                                        [
                                                                                                            [
                                                                                                                [
                                                                                                                    [
                                                                                                                        [
                                                                                                                            [
                                                                                                                                [
                                                                                                                                    [
                                                                                                                                        [
                                                                                                                                            [
                                                                                                                                                [
                                                                                                                                                    [
                                                                                                                                                        [
                                                                                                                                                            [
                                                                                                                                                                [
                                                                                                                                                                    [
                                                                                                                                                                        [
                                                                                                                                                                            [
                                                                                                                                                                                [
                                                                                                                                                                                    [
                                                                                                                                                                                        [
                                                                                                                                                                                            [
                                                                                                                                                                                                [
                                                                                                                                                                                                    [
                                                                                                                                                                                                        [
                                                                                                                                                                                                            [
                                                                                                                                                                                                                [
                                                                                                                                                                                                                    [
                                                                                                                                                                                                                        [
                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                                                        "x"
                                                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                ]
                                                                                                                                                                                                            ]
                                                                                                                                                                                                        ]
                                                                                                                                                                                                    ]
                                                                                                                                                                                                ]
                                                                                                                                                                                            ]
                                                                                                                                                                                        ]
                                                                                                                                                                                    ]
                                                                                                                                                                                ]
                                                                                                                                                                            ]
                                                                                                                                                                        ]
                                                                                                                                                                    ]
                                                                                                                                                                ]
                                                                                                                                                            ]
                                                                                                                                                        ]
                                                                                                                                                    ]
                                                                                                                                                ]
                                                                                                                                            ]
                                                                                                                                        ]
                                                                                                                                    ]
                                                                                                                                ]
                                                                                                                            ]
                                                                                                                        ]
                                                                                                                    ]
                                                                                                                ]
                                                                                                            ]
                                                                                                        ]
                                                                                                    ]
                                                                                                ]
                                                                                            ]
                                                                                        ]
                                                                                    ]
                                                                                ]
                                                                            ]
                                                                        ]
                                                                    ]
                                                                ]
                                                            ]
                                                        ]
                                                    ]
                                                ]
                                            ]
                                        ]
                                    ]
                                ]
                            ]
                        ]
                    ]
                ]
            }
        },
        "nested more than",
    ),
]


@pytest.mark.parametrize(("change", "pattern"), BAD_INPUTS)
def test_bad_input_is_refused_with_a_clear_message(change: dict[str, Any], pattern: str) -> None:
    """Bad input raises InvalidRequestError (a ValueError) that says what is wrong."""
    with pytest.raises(InvalidRequestError, match=pattern) as caught:
        build_request(**{**GOOD, **change})
    assert isinstance(caught.value, ValueError)


def test_good_input_is_encoded_as_strict_compact_json() -> None:
    """Unicode is sent as UTF-8, tuples become arrays, nothing else is added."""
    request = build_request(
        123, "jöhn@example.com", "Grüße 👋", {"tags": ("a", "b"), "n": 1.5, "ok": None}
    )
    assert json.loads(request.body) == {
        "assistant_id": 123,
        "customer_identifier": "jöhn@example.com",
        "message": "Grüße 👋",
        "variables": {"tags": ["a", "b"], "n": 1.5, "ok": None},
    }
    assert "👋".encode() in request.body
    assert request.conversation_key == (123, "jöhn@example.com")
    assert b"variables" not in build_request(1, "c", "m").body


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "42"}, 42.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "-3"}, None),  # not delay-seconds (1*DIGIT): the policy's backoff
        ({"Retry-After": " 7 "}, 7.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past
        (
            {
                "Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT",
                "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
            },
            30.0,
        ),
        ({"Retry-After": "soon", "X-RateLimit-Reset": str(int(NOW) + 7)}, 7.0),
        ({"X-RateLimit-Reset": "12"}, None),  # not an epoch: ignored
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "1e999"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    """Seconds, fractions, HTTP dates (against the server's Date) and the reset fallback."""
    assert retry_after(headers, NOW) == expected


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://app.autocalls.ai/api/", True),
        ("http://127.0.0.1:8000/api", True),
        ("http://localhost:8000/api", True),
        ("http://[::1]:8000/api", True),
        ("http://app.autocalls.ai/api", False),
        ("http://10.0.0.5/api", False),
        ("ftp://example.com", False),
        ("app.autocalls.ai/api", False),
        ("https://user:pw@app.autocalls.ai/api", False),
        ("https://app.autocalls.ai/api?x=1", False),
    ],
)
def test_base_url_rules(url: str, ok: bool) -> None:
    """https anywhere; http only to loopback; no credentials or query in the URL."""
    if ok:
        assert not str(check_base_url(url)).endswith("/")
    else:
        with pytest.raises(InvalidRequestError):
            check_base_url(url)


def test_token_rules_never_echo_the_token() -> None:
    """Whitespace around a token is forgiven; CR/LF or spaces inside are refused unseen."""
    assert check_token("  sk-abc\n") == "sk-abc"
    for bad in ("sk-abc\r\nX-Evil: 1", "sk abc", "sk-äbc", ""):
        with pytest.raises(InvalidRequestError) as caught:
            check_token(bad)
        assert bad.strip() not in str(caught.value) or not bad.strip()
    with pytest.raises(InvalidRequestError, match="AUTOCALLS_API_TOKEN"):
        check_token(None)
    with pytest.raises(InvalidRequestError, match="must be a str"):
        check_token(123)


def test_excerpt_is_short_and_single_line() -> None:
    """HTML bodies become their title or text, collapsed and capped."""
    assert excerpt(b"<html><title> Oops </title></html>", "text/html") == "Oops"
    long = excerpt(b"word " * 1000)
    assert len(long) == 200 and long.endswith("…")


# -- Retry-After per RFC 9110 (issue 10, item 9) ----------------------------------------------

DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
DATE_EPOCH = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "retry",
    [
        "Wed, 21 Oct 2015 07:29:30 GMT",  # IMF-fixdate
        "Wednesday, 21-Oct-15 07:29:30 GMT",  # obsolete RFC 850
        "Wed Oct 21 07:29:30 2015",  # obsolete asctime: no zone written, GMT all the same
    ],
)
def test_retry_after_http_dates_are_gmt(retry: str) -> None:
    """All three HTTP date forms of RFC 9110 are read as GMT: 90 s after the server's Date."""
    assert retry_after({"Retry-After": retry, "Date": DATE}, NOW) == 90.0


def test_asctime_with_a_one_digit_day_and_two_digit_years() -> None:
    """asctime pads the day with a space; an RFC 850 year more than 50 years ahead is past."""
    headers = {"Retry-After": "Sun Nov  6 08:49:37 1994", "Date": "Sun, 06 Nov 1994 08:49:00 GMT"}
    assert retry_after(headers, NOW) == 37.0
    # NOW is in 2026: "94" is 1994 (2094 would be more than 50 years ahead), "70" is 2070.
    old = {"Retry-After": "Sunday, 06-Nov-94 08:49:37 GMT", "Date": "Sun, 06 Nov 1994 08:49:00 GMT"}
    assert retry_after(old, NOW) == 37.0
    ahead = {
        "Retry-After": "Thursday, 01-Jan-70 00:00:10 GMT",
        "Date": "Thu, 01 Jan 2070 00:00:00 GMT",
    }
    assert retry_after(ahead, NOW) == 10.0


def test_retry_after_dates_ignore_the_local_time_zone(tmp_path: Path) -> None:
    """In a UTC-8 zone an asctime date was read as local time (28,830 s instead of 30):
    checked in a child process whose TZ is America/Los_Angeles."""
    import subprocess
    import sys

    code = (
        "import time; from autocalls_async._wire import retry_after;"
        "assert time.localtime(0).tm_gmtoff == -8 * 3600, time.localtime(0);"
        "print(retry_after({'Retry-After': 'Wed Oct 21 07:28:30 2015',"
        f" 'Date': {DATE!r}}}, {NOW}),"
        "      retry_after({'Retry-After': 'Wed Oct 21 07:28:30 2015'},"
        f" {DATE_EPOCH}))"
    )
    env = {"TZ": "America/Los_Angeles", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["30.0", "30.0"]


@pytest.mark.parametrize(
    "value",
    [
        "1_000",  # float() accepts it
        "\u0661\u0662",  # Arabic-Indic digits: float() accepts them too
        "\uff11\uff12",  # full-width digits
        "1e3",
        "inf",
        "0x10",
        "+5",
        "5.",
        ".5",
        "Wed, 21 Oct 2015 07:28:30 UTC",  # HTTP dates are GMT, written GMT
        "Wed, 21 Oct 2015 25:28:30 GMT",
        "Wed, 31 Feb 2015 07:28:30 GMT",
        "2015-10-21T07:28:30Z",
    ],
)
def test_retry_after_refuses_what_rfc_9110_does_not_allow(value: str) -> None:
    """Only ASCII digits with an optional fraction, or an RFC 9110 date: anything else is
    ignored (the policy's own backoff applies) rather than misread."""
    assert retry_after({"Retry-After": value, "Date": DATE}, NOW) is None
    assert retry_after({"X-RateLimit-Reset": value}, NOW) is None


def test_retry_after_keeps_a_fraction_and_a_leap_second() -> None:
    assert retry_after({"Retry-After": "0.25"}, NOW) == 0.25
    leap = {"Retry-After": "Wed, 31 Dec 2014 23:59:60 GMT", "Date": "Wed, 31 Dec 2014 23:59:00 GMT"}
    assert retry_after(leap, NOW) == 59.0


# -- any Mapping in variables (issue 10, item 8) ----------------------------------------------


def test_any_mapping_in_variables_is_encoded() -> None:
    """MappingProxyType, a nested ChainMap, a custom Mapping, tuples and IntEnum values are
    sent as plain JSON; json.dumps alone raised a bare TypeError on them."""
    import enum
    from collections import ChainMap, OrderedDict
    from collections.abc import Iterator, Mapping
    from types import MappingProxyType

    class Frozen(Mapping[str, Any]):
        def __init__(self, **data: Any) -> None:
            self._data = data

        def __getitem__(self, key: str) -> Any:
            return self._data[key]

        def __iter__(self) -> Iterator[str]:
            return iter(self._data)

        def __len__(self) -> int:
            return len(self._data)

    class Level(enum.IntEnum):
        GOLD = 3

    variables = MappingProxyType(
        {
            "plan": ChainMap({"tier": "gold"}, {"tier": "silver", "seats": 2}),
            "tags": ("a", MappingProxyType({"b": 1})),
            "custom": Frozen(level=Level.GOLD, ok=True),
            "ordered": OrderedDict(x=1.5),
        }
    )
    body = json.loads(build_request(123, "+1", "m", variables).body)
    assert body["variables"] == {
        "plan": {"tier": "gold", "seats": 2},
        "tags": ["a", {"b": 1}],
        "custom": {"level": 3, "ok": True},
        "ordered": {"x": 1.5},
    }
    assert build_request(123, "+1", "m", ChainMap({"a": 1})).body.endswith(b'"variables":{"a":1}}')


def test_a_mapping_that_cannot_be_encoded_is_an_invalid_request() -> None:
    """Non-str keys inside a nested Mapping, a set, a Mapping whose items() fails: all are
    InvalidRequestError naming the path, never a bare TypeError."""
    from collections import ChainMap
    from collections.abc import Iterator, Mapping
    from types import MappingProxyType

    class Broken(Mapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            return iter(["x"])

        def __len__(self) -> int:
            return 1

    cases = [
        (ChainMap({"a": MappingProxyType({1: "x"})}), "variables['a'] has a key 1"),
        (MappingProxyType({"s": {1, 2}}), "variables['s'] is a set"),
        ({"b": Broken()}, "variables['b'] could not be read as a mapping"),
    ]
    for variables, words in cases:
        with pytest.raises(InvalidRequestError, match=words.replace("[", r"\[")):
            build_request(123, "+1", "m", variables)


# -- values that cannot be encoded, and subclasses (issue 22, item 5) -------------------------


@pytest.mark.parametrize(
    "value",
    [10**5000, -(10**5000), 2**63, -(2**63) - 1, [1, {"deep": 10**30}]],
    ids=["10**5000", "-10**5000", "2**63", "-2**63-1", "nested 10**30"],
)
def test_an_integer_the_service_cannot_read_is_an_invalid_request(value: object) -> None:
    """10**5000 made json.dumps raise a bare ValueError; anything outside the signed 64-bit
    range would reach PHP as an approximate float. Refused before sending, with the fix."""
    with pytest.raises(InvalidRequestError, match="64-bit range .* send it as a string"):
        build_request(123, "+1", "m", {"n": value})


def test_the_64_bit_range_itself_is_sent() -> None:
    variables = {"max": 2**63 - 1, "min": -(2**63)}
    body = json.loads(build_request(123, "+1", "m", variables).body)
    assert body["variables"] == variables


def test_subclasses_are_sent_as_the_data_they_hold() -> None:
    """The one rule: a subclass of str, int or float is sent as its string, integer or float
    data, whatever its __str__, __int__, __index__, __float__, __repr__, __eq__ or __hash__
    say; in variables (values and keys) and in the call's own arguments."""
    import enum

    class Shouty(str):
        def __str__(self) -> str:
            return "SHOUTED"

        def __repr__(self) -> str:
            return "Shouty()"

        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return 0

    class Lying(int):
        def __int__(self) -> int:
            return -1

        def __index__(self) -> int:
            return -2

        def __str__(self) -> str:
            return "lie"

    class Odd(float):
        def __float__(self) -> float:
            return -1.0

        def __repr__(self) -> str:
            return "nan"

    class Colour(enum.StrEnum):
        RED = "red"

    class Level(enum.IntEnum):
        GOLD = 3

    request = build_request(
        Lying(123),
        Shouty("+14155551234"),
        Shouty("hello"),
        {
            Shouty("key"): Shouty("value"),
            "n": Lying(7),
            "x": Odd(1.5),
            "c": Colour.RED,
            "l": Level.GOLD,
        },
    )
    body = json.loads(request.body)
    assert body == {
        "assistant_id": 123,
        "customer_identifier": "+14155551234",
        "message": "hello",
        "variables": {"key": "value", "n": 7, "x": 1.5, "c": "red", "l": 3},
    }
    assert request.conversation_key == (123, "+14155551234")
    assert type(request.conversation_key[1]) is str and type(request.assistant_id) is int


_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.text(max_size=5),
    st.lists(
        st.one_of(
            st.text(max_size=3),
            st.dictionaries(st.sampled_from(["name", "args"]), st.text(max_size=3)),
        ),
        max_size=2,
    ),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


_DOCUMENTED = st.fixed_dictionaries(
    {"conversation_id": st.text(max_size=5), "reply": st.text(max_size=5)},
    optional={
        "customer_identifier": st.text(max_size=5),
        "function_calls": st.lists(
            st.dictionaries(st.sampled_from(["name", "args", "function"]), _FIELD_VALUES),
            max_size=3,
        ),
        "ai_disabled": st.booleans(),
        "extra": _FIELD_VALUES,
    },
)
_ANY_SHAPE = st.dictionaries(
    st.sampled_from(
        ["conversation_id", "customer_identifier", "reply", "function_calls", "ai_disabled"]
    ),
    _FIELD_VALUES,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_DOCUMENTED, _ANY_SHAPE))
def test_the_usual_replys_shortcut_agrees_with_the_converter(fields: dict[str, Any]) -> None:
    """A body of the documented shape is made into a ``Reply`` without the converter; any
    body, that shape or not, gives what the converter gives: the same reply or an error."""
    body = json.dumps({"success": True, **fields}).encode()

    def outcome() -> Any:
        try:
            reply = parse_reply(200, {}, body, customer_identifier="+1415", now=0.0)
        except APIError as exc:
            return type(exc)
        return (reply, reply.raw, reply.function_calls)

    fast = outcome()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "_usual_reply", lambda data, customer: None)
        assert outcome() == fast


# ------------------------------------------------------------------ the per-call fast paths


def test_trim_strips_what_the_regex_strips_at_every_code_point() -> None:
    """``trim`` is ``str.strip`` with a set of characters made once; Laravel's TrimStrings
    (the regex) is the reference, at either end, for every character."""
    for code in range(0x110000):
        char = chr(code)
        for text in (f"a{char}", f"{char}a", f"{char}{char}", char):
            assert wire.trim(text) == wire._TRIM.sub("", text), hex(code)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=wire.MIN_JSON_INT, max_value=wire.MAX_JSON_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _JSON, max_size=5), st.text(min_size=1), st.text(min_size=1))
def test_the_body_is_what_json_dumps_makes(
    variables: dict[str, Any], customer: str, text: str
) -> None:
    """The encoder made once, and the flat ``variables`` copied directly, give the bytes that
    ``json.dumps`` gives for the same payload (or the same refusal)."""
    payload = {
        "assistant_id": 7,
        "customer_identifier": f"c{customer}",
        "message": f"m{text}",
        "variables": variables,
    }
    try:
        expected = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        expected = None  # a lone surrogate
    try:
        request = build_request(7, f"c{customer}", f"m{text}", variables)
    except InvalidRequestError:
        assert expected is None
        return
    assert request.body == expected
    assert json.loads(request.body)["variables"] == variables


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _JSON, max_size=5), st.sampled_from(["", " ", "\n", "\t "]))
def test_a_body_is_decoded_as_json_loads_decodes_it(data: dict[str, Any], space: str) -> None:
    text = json.dumps(data, ensure_ascii=False)
    for body in (text, f"{space}{text}{space}", f"{text}x", text[:-1], f"{text}{text}"):
        try:
            expected = json.loads(body)
        except ValueError:
            expected = None
        assert wire._decode_json(body.encode()) == expected
