"""The public surface: the contract's names, exported and nothing private leaking."""

from __future__ import annotations

import autocalls_async as sdk

CONTRACT = {
    "AsyncAutocalls",
    "RateLimit",
    "Reply",
    "FunctionCall",
    "AutocallsError",
    "InvalidRequestError",
    "RateLimitTimeout",
    "ClientClosedError",
    "APIConnectionError",
    "APITimeoutError",
    "APIError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "AssistantNotFoundError",
    "InsufficientBalanceError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "APIResponseValidationError",
    "Budget",
    "BudgetExceededError",
}


def test_all_is_pinned_sorted_and_complete() -> None:
    """__all__ holds the contract's names plus the documented extras, sorted, all importable."""
    assert set(sdk.__all__) >= CONTRACT
    assert sdk.__all__ == sorted(sdk.__all__, key=lambda n: (n.startswith("_"), n))
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None
    assert sdk.__version__.count(".") == 2


def test_error_tree_matches_the_contract() -> None:
    """The hierarchy, including the built-in bases users catch."""
    expected = {
        sdk.InvalidRequestError: (sdk.AutocallsError, ValueError),
        sdk.RateLimitTimeout: (sdk.AutocallsError, TimeoutError),
        sdk.ClientClosedError: (sdk.AutocallsError,),
        sdk.BudgetExceededError: (sdk.AutocallsError,),
        sdk.APIConnectionError: (sdk.AutocallsError,),
        sdk.APITimeoutError: (sdk.APIConnectionError, TimeoutError),
        sdk.APIError: (sdk.AutocallsError,),
        sdk.AuthenticationError: (sdk.APIError,),
        sdk.PermissionDeniedError: (sdk.APIError,),
        sdk.NotFoundError: (sdk.APIError,),
        sdk.AssistantNotFoundError: (sdk.NotFoundError,),
        sdk.InsufficientBalanceError: (sdk.APIError,),
        sdk.UnprocessableEntityError: (sdk.APIError,),
        sdk.RateLimitError: (sdk.APIError,),
        sdk.InternalServerError: (sdk.APIError,),
        sdk.APIResponseValidationError: (sdk.APIError,),
    }
    for cls, bases in expected.items():
        for base in bases:
            assert issubclass(cls, base), (cls, base)


def test_value_types_are_frozen_slotted_attrs() -> None:
    """Reply, FunctionCall and RateLimit are frozen attrs classes with slots."""
    import attrs

    for cls in (
        sdk.Reply,
        sdk.FunctionCall,
        sdk.RateLimit,
        sdk.Conversation,
        sdk.Budget,
        sdk.Usage,
        sdk.AssistantUsage,
    ):
        assert attrs.has(cls)
        assert "__slots__" in cls.__dict__
    limit = sdk.RateLimit(5, 60.0)
    try:
        limit.requests = 6  # type: ignore[misc]
    except attrs.exceptions.FrozenInstanceError:
        pass
    else:  # pragma: no cover
        raise AssertionError("RateLimit is mutable")


def test_unknown_attribute_is_an_attribute_error() -> None:
    """The lazy loader for the Redis extra does not swallow typos."""
    import pytest

    with pytest.raises(AttributeError, match="NoSuchThing"):
        sdk.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
