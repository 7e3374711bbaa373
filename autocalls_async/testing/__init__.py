"""A local emulator of the Autocalls "generate AI reply" service, for tests and demos.

The real service is a Laravel application; the emulator reproduces what a client can observe
of it, framework behaviour included, so code tested here behaves the same in production:

```python
from autocalls_async.testing import Fault, MockAutocalls

async with MockAutocalls(rate_limit=(5, 60.0), assistants=(123,)) as server:
    client = AsyncAutocalls("any-token", base_url=server.base_url)  # http://127.0.0.1:PORT/api
    server.inject(Fault.status(503, headers={"Retry-After": "1"}))
    ...
    assert server.conversations[(123, "+14155551234")].messages == ["Hi"]
```

``POST /api/ai/generate-reply`` (``server.url``), in the service's order:

1. **Auth** (Sanctum): ``Authorization: Bearer <token>``; missing, blank or not in ``tokens``
   -> 401 ``{"message": "Unauthenticated."}``. Not counted by the throttle.
2. **Fault** injection, if one is queued or drawn (see ``Fault``).
3. **Throttle**, per token (keyed by a SHA-256 of it: the emulator never keeps a raw token):
   every request it allows is counted on arrival, *including* ones that then fail validation
   or get 404/402; refused ones are not counted. ``window="rolling"``: at most N arrivals in
   any rolling period (strict); ``"fixed"``: Laravel's window anchored at the first hit;
   ``"no-burst"``: nginx's ``limit_req`` without ``burst``, a request less than
   ``period / N`` after the previous one allowed is refused. ``burst=b`` lets ``b`` come back
   to back (nginx's ``burst=b-1 nodelay``), then one per ``period / N``, on any shape.
   429 ``{"message": "Too Many Attempts."}`` with ``Retry-After`` (whole seconds, >= 1),
   ``X-RateLimit-Limit``, ``X-RateLimit-Remaining: 0`` and ``X-RateLimit-Reset`` (epoch);
   allowed responses carry ``X-RateLimit-Limit`` / ``-Remaining``. At a scaled period (not
   60 s) both also carry ``RateLimit-Policy: N;w=SECONDS`` (the IETF draft's form), since
   ``X-RateLimit-Limit`` alone means "per minute".
4. **Validation** after ``TrimStrings`` and ``ConvertEmptyStringsToNull``; invalid JSON is an
   empty input. 422 with Laravel's messages: ``{"message": "The assistant id field is
   required. (and 2 more errors)", "errors": {"assistant_id": [...], ...}}``. Deliberately
   stricter than PHP: ``assistant_id`` must be a JSON integer (no ``"123"``, ``true``,
   ``1.0``) >= 1 and ``variables`` a JSON object (no list).
5. Unknown assistant -> 404 ``ASSISTANT_NOT_FOUND``; balance used up -> 402
   ``INSUFFICIENT_BALANCE`` (``{"success": false, "error": ..., "error_code": ...}``).
6. **Reply**: the conversation of (assistant_id, customer_identifier) keeps one UUID, merges
   ``variables`` (later values win), records the message, charges one reply, waits
   ``reply_delay`` and answers ``{"success": true, "conversation_id", "customer_identifier",
   "reply", "function_calls", "ai_disabled"}``. The default reply is predictable ("Hi John!
   Thanks for your message: Hi"); a message about booking also gets a ``book_appointment``
   function call. ``server.disable_ai(...)``: the conversation answers ``ai_disabled: true``,
   ``reply: null``, still records the message and charges nothing. Pass ``responder=`` to
   script replies.

Content negotiation is Laravel's: framework errors (401, 405, 422, 429, 500, 503) are JSON only
when the most preferred ``Accept`` type is JSON, otherwise an HTML error page; the application's
own errors (404/402 above) and successes are always JSON. JSON is encoded as PHP does (compact,
``\\u`` escapes, ``\\/``). Laravel itself would *redirect* a non-JSON 401 or 422 (302 to the
login page / back); the emulator answers an HTML page with the status instead.

Inspection: ``server.requests`` (a ``RequestRecord`` per request: time, token hash, decoded
body, status, counted, processed, conversation_id, fault), ``server.conversations`` /
``server.conversation(a, c)`` (``Conversation``: ``conversation_id``, ``variables``,
``messages``, ``replies``, ``turns``), ``server.replies_served``, ``server.balance_remaining``,
``server.pending_faults``, ``server.count(status=..., processed=...)``, ``server.reset()``.

Faults: ``server.inject(Fault.drop(processed=True), times=1)`` queues faults for the next
authenticated requests (FIFO); ``server.set_random_faults({Fault.status(503): 0.1}, seed=7)``
draws them at random, reproducibly. ``processed=False`` faults answer before the application
(not counted, not processed: safe to retry); ``processed=True`` ones run the whole pipeline
and then replace, delay or drop the response (unsafe to retry). See ``Fault``.

pytest: add ``pytest_plugins = ["autocalls_async.testing.pytest_plugin"]`` to your root
``conftest.py`` for an ``autocalls_server`` fixture (started, unlimited rate);
``@pytest.mark.autocalls_server(rate_limit=(5, 0.5), balance=3)`` passes options to it.

Outside tests: ``await run_server("127.0.0.1", 8000, ready=callback, **options)`` serves until
cancelled (the ``autocalls-async mock-server`` command), and ``MockAutocalls(...).app`` is the
plain ``aiohttp.web.Application`` for running it any other way.
"""

from ._faults import Fault, FaultKind
from ._server import (
    ENDPOINT,
    AccessRecord,
    MockAutocalls,
    ServerOptions,
    run_server,
    token_hash,
)
from ._state import Conversation, RequestRecord, Responder, Turn, default_responder

__all__ = [
    "ENDPOINT",
    "AccessRecord",
    "Conversation",
    "Fault",
    "FaultKind",
    "MockAutocalls",
    "RequestRecord",
    "Responder",
    "ServerOptions",
    "Turn",
    "default_responder",
    "run_server",
    "token_hash",
]
