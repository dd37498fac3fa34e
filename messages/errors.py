"""The one place where walletcore errors cross the Temporal boundary, in both directions.

Out: a WalletError becomes `ApplicationError(message, {"field", "message"}, type=<class name>,
non_retryable=not retryable)`. Back: the client walks a failure's cause chain to the first
ApplicationError whose type names a walletcore error and rebuilds that error, so callers catch
InsufficientFundsError etc., never Temporal types. No I/O: the workflow imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from walletcore.errors import ERRORS_BY_NAME, ConfigurationError, InvalidInputError, WalletError

CAUSE_DEPTH_MAX = 16  # failure chains are short (update -> activity -> application)


def to_application_error(err: WalletError) -> ApplicationError:
    return ApplicationError(
        str(err),
        {"field": err.field, "message": err.message},
        type=err.type_name,
        non_retryable=not err.retryable,
        # A refused operation (insufficient funds, bad input) is an answer, not an incident:
        # benign errors are logged at DEBUG by the SDK instead of with a traceback. A
        # configuration error is an incident for the operator: logged in full.
        category=(
            ApplicationErrorCategory.UNSPECIFIED
            if err.retryable or isinstance(err, ConfigurationError)
            else ApplicationErrorCategory.BENIGN
        ),
    )


@contextmanager
def wallet_errors_as_application_errors() -> Iterator[None]:
    """Wrap activity bodies: domain errors leave as typed ApplicationErrors."""
    try:
        yield
    except WalletError as err:
        raise to_application_error(err) from err


def application_errors(exc: BaseException | None) -> Iterator[ApplicationError]:
    """ApplicationErrors along `exc`'s cause chain, outermost first."""
    depth = 0
    while exc is not None and depth < CAUSE_DEPTH_MAX:
        if isinstance(exc, ApplicationError):
            yield exc
        exc = exc.__cause__
        depth += 1


def wallet_error_of(failure: ApplicationError) -> WalletError | None:
    """Rebuild the walletcore error an ApplicationError carries, or None if it carries none."""
    cls = ERRORS_BY_NAME.get(failure.type or "")
    if cls is None:
        return None
    field: str | None = None
    message = failure.message
    details: Any = failure.details[0] if failure.details else None
    if isinstance(details, dict):
        field = details.get("field") if isinstance(details.get("field"), str) else None
        if isinstance(details.get("message"), str):
            message = details["message"]
    return cls(message, field=field)


def wallet_error_from_failure(exc: BaseException | None) -> WalletError | None:
    """The walletcore error somewhere in a Temporal failure chain, if any."""
    for failure in application_errors(exc):
        err = wallet_error_of(failure)
        if err is not None:
            return err
    return None


def invalid_input(message: str, field: str) -> ApplicationError:
    """A rejection naming the input field, as the update validator raises it."""
    return to_application_error(InvalidInputError(message, field=field))
