"""The one exception hierarchy, grouped by what the caller does next."""

from __future__ import annotations


class ProcpollError(Exception):
    """Root of every error procpoll raises on purpose."""


class ConfigError(ProcpollError):
    """The configuration is unusable: report every problem and exit 78 (EX_CONFIG).

    `problems` holds one line per problem, each naming the file and the dotted key.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ApiError(ProcpollError):
    """A VOD API call failed; subclasses say whether to retry."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(f"{code}: {message}")


class TransientApiError(ApiError):
    """Network error, throttling, InternalError, non-200: retry with backoff."""


class AuthError(ApiError):
    """AuthFailure.*: credentials are wrong or expired; back off long, keys get rotated."""


class PermanentApiError(ApiError):
    """Any other API error: retrying the same call will not help."""


class ExpiredHandleError(ApiError):
    """ConfirmEvents refused a handle (InvalidParameterValue): VOD will redeliver it."""


class EventParseError(ProcpollError):
    """A pulled item cannot become an Event; `path` is the JSON path of the culprit."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class SinkError(ProcpollError):
    """A sink did not deliver. `retryable` says whether another attempt may succeed."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        self.reason = reason
        self.retryable = retryable
        super().__init__(reason)


class LedgerError(ProcpollError):
    """The ledger could not record a delivery: nothing may be confirmed on its word."""
