"""Fuzzing the pure layer: whatever comes in, only the SDK's own errors come out."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from autocalls_async import APIError, AutocallsError, InvalidRequestError
from autocalls_async._wire import build_request, parse_reply, retry_after

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
reply_like = st.fixed_dictionaries(
    {},
    optional={
        "success": json_values,
        "conversation_id": json_values,
        "customer_identifier": json_values,
        "reply": json_values,
        "function_calls": json_values,
        "ai_disabled": json_values,
        "error": json_values,
        "error_code": json_values,
        "message": json_values,
        "errors": json_values,
        "raw": json_values,
    },
)
statuses = st.sampled_from([200, 201, 204, 301, 400, 401, 402, 403, 404, 422, 429, 500, 503])
headers = st.dictionaries(
    st.sampled_from(["Retry-After", "Date", "X-RateLimit-Reset", "Content-Type", "Location"]),
    st.text(max_size=40),
)


def only_sdk_errors(status: int, head: dict[str, str], body: bytes) -> None:
    try:
        parse_reply(status, head, body, customer_identifier="c", now=1.7e9)
    except AutocallsError as exc:
        assert isinstance(exc, APIError)
        assert len(str(exc)) < 2000


@settings(max_examples=1500, deadline=None)
@given(status=statuses, head=headers, body=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_sdk_errors(
    status: int, head: dict[str, str], body: bytes
) -> None:
    """Any bytes, any status, any headers: a Reply or an APIError, never KeyError/TypeError."""
    only_sdk_errors(status, head, body)


#: 500 examples: 1,500 cost 34 s of CPU under coverage (the parse goes through cattrs); the
#: shapes drawn are the same, and every run draws new ones (failures are kept in .hypothesis).
@settings(max_examples=500, deadline=None)
@given(status=statuses, head=headers, data=reply_like | json_values)
def test_arbitrary_json_raises_only_sdk_errors(
    status: int, head: dict[str, str], data: Any
) -> None:
    """Any JSON document, reply-shaped or not, never leaks a cattrs or built-in error."""
    only_sdk_errors(status, head, json.dumps(data).encode())


@settings(max_examples=500, deadline=None)
@given(head=headers, now=st.floats(allow_nan=True, allow_infinity=True))
def test_retry_after_never_raises(head: dict[str, str], now: float) -> None:
    """Retry-After parsing returns a non-negative number or None, whatever it is given."""
    value = retry_after(head, now)
    assert value is None or value >= 0 or value != value


anything = st.one_of(
    json_values,
    st.integers(),
    st.text(),
    st.binary(),
    st.builds(object),
    st.dictionaries(st.one_of(st.text(), st.integers()), json_values, max_size=4),
    st.lists(json_values, max_size=3),
)


@settings(max_examples=500, deadline=None)  # as above: 1,500 cost 20 s of CPU
@given(assistant_id=anything, customer=anything, message=anything, variables=st.none() | anything)
def test_arbitrary_inputs_are_sent_as_json_or_refused(
    assistant_id: Any, customer: Any, message: Any, variables: Any
) -> None:
    """Any arguments either encode to strict JSON that means the same, or raise
    InvalidRequestError."""
    try:
        request = build_request(assistant_id, customer, message, variables)
    except InvalidRequestError:
        return
    decoded = json.loads(request.body.decode("utf-8"))
    assert decoded["assistant_id"] == assistant_id
    assert decoded["customer_identifier"] == customer
    assert decoded["message"] == message
    if variables is not None:
        assert json.loads(json.dumps(variables)) == decoded["variables"]
