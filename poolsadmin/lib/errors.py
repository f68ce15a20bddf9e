"""Domain errors. Each carries the HTTP status an API maps it to, so views stay thin."""

from __future__ import annotations


class DomainError(Exception):
    http_status = 400
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def as_dict(self) -> dict[str, str]:
        body = {"error": self.code, "detail": self.message}
        # `is not None`: a JSON key "" is a field too, and a 400 about it must still name it.
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidInput(DomainError):
    http_status = 400
    code = "invalid_input"


class Unauthenticated(DomainError):
    http_status = 401
    code = "unauthenticated"


class Forbidden(DomainError):
    http_status = 403
    code = "forbidden"


class NotFound(DomainError):
    http_status = 404
    code = "not_found"


class Conflict(DomainError):
    """A refused state transition or a stale write."""

    http_status = 409
    code = "conflict"
