"""8. The redaction's cost: what masking the token adds to each response the SDK reads.

Every response's body and headers go through ``Redactor`` before anything reads them. The
usual response holds no trace of the token, and then the cost is the quick check: a few dozen
substring searches for the blocks that any long run of the token (as is, reversed, base64 or
hex) must hold whole, plus the search for escapes. Measured on the bodies the SDK meets: a
reply, a long reply, an error, a 10 KiB HTML error page, a PHP-escaped reply (``\\/``,
``\\u00e9``: the slower path that decodes), and the response headers; then a body that does
echo the token, for scale. A 40-character token, as the service issues.
"""

from __future__ import annotations

import json
import statistics
import timeit

from autocalls_async._wire import Redactor

from ._common import BenchResult, Config, spread

NAME = "redaction"
TITLE = "the token's redaction, per response"
TOKEN = "42|Zt8Qm2Lx9Vb4Nc7Rf1Hj6Kp3Ws5Yd0Ga8Ue2Io"

_REPLY = {
    "success": True,
    "conversation_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "customer_identifier": "+14155551234",
    "reply": "Hello John, your appointment is confirmed for Tuesday at 10:00.",
    "function_calls": [{"name": "book", "arguments": {"day": "tuesday", "time": "10:00"}}],
    "ai_disabled": False,
}
BODIES: dict[str, bytes] = {
    "reply (350 B)": json.dumps(_REPLY).encode(),
    "long reply (4 KiB)": json.dumps({**_REPLY, "reply": "Sure, " * 680}).encode(),
    "error (80 B)": (
        b'{"success":false,"error":"Assistant not found","error_code":"ASSISTANT_NOT_FOUND"}'
    ),
    "HTML error page (10 KiB)": (
        b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
        + b"<p>The upstream server did not answer in time.</p>" * 200
        + b"</body></html>"
    ),
    "PHP-escaped reply (decoded)": json.dumps(
        {**_REPLY, "reply": "Voil\\u00e0: https:\\/\\/example.com\\/booking"}
    ).encode(),
    "echoing the token (masked)": json.dumps(
        {"message": f"Invalid credentials: Bearer {TOKEN}"}
    ).encode(),
}
HEADERS = {
    "Content-Type": "application/json",
    "Date": "Mon, 07 Dec 2026 17:00:00 GMT",
    "Server": "nginx",
    "X-RateLimit-Limit": "5",
    "X-RateLimit-Remaining": "4",
    "Cache-Control": "no-cache, private",
}


def _per_call_us(call: object, rounds: int, number: int) -> list[float]:
    timer = timeit.Timer(call)  # type: ignore[arg-type]
    return [seconds / number * 1e6 for seconds in timer.repeat(rounds, number)]


def run(config: Config) -> BenchResult:
    rounds = config.pick_rounds(7, 2)
    number = 200 if config.quick else 20_000
    redactor = Redactor(TOKEN)
    result = BenchResult(NAME, TITLE, params={"rounds": rounds, "calls_per_round": number})
    for case, body in BODIES.items():
        values = _per_call_us(lambda body=body: redactor.body(body), rounds, number)
        row = result.add(
            case, "body", statistics.median(values), unit="µs", spread=spread(values), digits=1
        )
        if case.startswith(("reply", "error")):
            row.expect("≤ 5 µs", lambda v: v <= 5.0)
    values = _per_call_us(lambda: redactor.headers(HEADERS), rounds, number)
    result.add(
        "6 response headers",
        "headers",
        statistics.median(values),
        unit="µs",
        spread=spread(values),
        digits=1,
    ).expect("≤ 5 µs", lambda v: v <= 5.0)
    return result


if __name__ == "__main__":  # pragma: no cover
    for row in run(Config()).rows:
        print(row.case, row.metric, *row.formatted())
