"""The pure wire layer: recorded responses in tests/samples/, request validation, Retry-After."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import autocalls_async as sdk
from autocalls_async import APIError, InvalidRequestError, Reply
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
        ({"Retry-After": "-3"}, 0.0),
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
