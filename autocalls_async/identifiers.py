"""Customer identifier normalisers: one customer, one spelling, one conversation.

The service keeps a conversation per (assistant_id, customer_identifier) and compares
identifiers as plain strings, so ``+1 (415) 555-1234``, ``415-555-1234`` and ``+14155551234``
are three conversations, each without the context of the others. Its documentation's advice is
"always use the same format for customer identifiers (e.g., always E.164 for phone numbers)".
Give the client a normaliser and it applies it to every identifier before validation, the
per-conversation order, the conversation cache and the request:

```python
from autocalls_async import AsyncAutocalls
from autocalls_async.identifiers import e164

client = AsyncAutocalls(normalize_identifier=e164("US"))
await client.generate_reply(assistant_id=123, customer_identifier="(415) 555-1234", ...)
client.conversation_id(123, "+1 415 555 1234")   # the same conversation
```

A normaliser is any callable ``str -> str``; it raises ``InvalidRequestError`` for an identifier
it refuses (nothing is sent). ``e164`` needs the ``phone`` extra (``pip install
'autocalls-async[phone]'``, which brings Google's libphonenumber metadata as ``phonenumbers``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import InvalidRequestError
from ._wire import trim

if TYPE_CHECKING:
    import phonenumbers

__all__ = ["Normalizer", "e164", "email"]

#: What ``AsyncAutocalls(normalize_identifier=...)`` accepts.
Normalizer = Callable[[str], str]

_SHOWN = 40  # characters of a refused identifier quoted in the error


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[: _SHOWN - 1] + "…")


def _phonenumbers() -> Any:
    try:
        import phonenumbers
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise ImportError(
            "autocalls_async.identifiers.e164 needs the phone extra (the phonenumbers "
            "package): pip install 'autocalls-async[phone]'"
        ) from exc
    return phonenumbers


def e164(
    default_region: str | None = None, *, strict: bool = False, allow_local_only: bool = False
) -> Normalizer:
    """Return a normaliser turning any parseable phone number into E.164 (``+14155551234``).

    ``default_region`` (ISO 3166 alpha-2, e.g. ``"US"``, ``"GB"``) is the country of numbers
    written without a leading ``+`` and country code (``"415-555-1234"``); without it such a
    number is refused. A number that is not *possible* (wrong length for its country), has an
    extension (E.164 cannot hold one, and dropping it would merge the conversations of everyone
    behind one switchboard) or is not a phone number at all raises ``InvalidRequestError``,
    saying which identifier and how to fix it. ``strict=True`` also refuses numbers that are
    possible but not assigned in the numbering plan (``is_valid_number``); off by default,
    because new ranges appear before the metadata knows them. A number that can only be dialled
    locally (``555-0199`` in the US: no area code) is refused, since prefixing the country code
    alone (``+15550199``) names nobody; ``allow_local_only=True`` accepts it as that.
    """
    lib = _phonenumbers()
    region: str | None = None
    if default_region is not None:
        if not isinstance(default_region, str):
            raise InvalidRequestError(
                f"default_region must be a region code such as 'US', got {default_region!r}"
            )
        region = default_region.strip().upper()
        if region not in lib.SUPPORTED_REGIONS:
            raise InvalidRequestError(
                f"default_region {default_region!r} is not a region phonenumbers knows; use an "
                "ISO 3166 alpha-2 code such as 'US', 'GB' or 'DE'"
            )
    how = (
        "write it with a leading + and its country code (e.g. +14155551234)"
        if region is None
        else f"write it as a {region} number or with a leading + and its country code"
    )

    def normalize(identifier: str) -> str:
        if not isinstance(identifier, str):
            raise InvalidRequestError(
                f"customer_identifier must be a str, got {type(identifier).__name__}"
            )
        text = trim(identifier)
        try:
            number: phonenumbers.PhoneNumber = lib.parse(text, region)
        except lib.NumberParseException as exc:
            if exc.error_type == lib.NumberParseException.INVALID_COUNTRY_CODE and region is None:
                raise InvalidRequestError(
                    f"customer_identifier {_shown(identifier)} has no country code: write it "
                    "with a leading + (e.g. +14155551234), or give a default region "
                    "(e164('US'), bulk --e164 US)"
                ) from None
            raise InvalidRequestError(
                f"customer_identifier {_shown(identifier)} is not a phone number "
                f"({str(exc).split(') ', 1)[-1].rstrip('.')}); {how}"
            ) from None
        if number.extension:
            raise InvalidRequestError(
                f"customer_identifier {_shown(identifier)} has an extension, which E.164 "
                "cannot hold; use one identifier per customer (e.g. their direct number)"
            )
        if (
            not allow_local_only
            and lib.is_possible_number_with_reason(number)
            == lib.ValidationResult.IS_POSSIBLE_LOCAL_ONLY
        ):
            raise InvalidRequestError(
                f"customer_identifier {_shown(identifier)} is a local number (no area code): "
                "it cannot be written in E.164; write it with its area code"
                + ("" if region is None else f" (a full {region} number)")
            )
        if not lib.is_possible_number(number) or (strict and not lib.is_valid_number(number)):
            what = "not a possible" if not lib.is_possible_number(number) else "not a valid"
            raise InvalidRequestError(
                f"customer_identifier {_shown(identifier)} is {what} phone number "
                f"(read as +{number.country_code} {number.national_number}); check its digits, "
                + how
            )
        result: str = lib.format_number(number, lib.PhoneNumberFormat.E164)
        return result

    normalize.__qualname__ = normalize.__name__ = (
        f"e164({default_region!r})" if not strict else f"e164({default_region!r}, strict=True)"
    )
    return normalize


def email() -> Normalizer:
    """Return a normaliser for e-mail addresses: trimmed, the domain lower-cased.

    Only the domain: DNS names are case-insensitive, but RFC 5321 (section 2.4) makes the local
    part (before the ``@``) case-sensitive, and some mail systems do deliver ``John@`` and
    ``john@`` to different people. Folding it would merge their conversations, which cannot be
    undone; keeping it costs, at worst, a second conversation. An identifier without exactly
    one usable ``@`` is refused (``InvalidRequestError``).
    """

    def normalize(identifier: str) -> str:
        if not isinstance(identifier, str):
            raise InvalidRequestError(
                f"customer_identifier must be a str, got {type(identifier).__name__}"
            )
        text = trim(identifier)
        local, at, domain = text.rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in text):
            raise InvalidRequestError(
                f"customer_identifier {_shown(identifier)} is not an e-mail address "
                "(expected local-part@domain, without spaces)"
            )
        return f"{local}@{domain.lower()}"

    normalize.__qualname__ = normalize.__name__ = "email()"
    return normalize
