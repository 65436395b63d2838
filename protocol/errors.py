"""The error taxonomy: every paychan error carries the JSON-RPC code/data pair of DESIGN §8."""
from __future__ import annotations

from typing import Any, ClassVar

# Top-level JSON-RPC codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32000
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
UNAUTHORIZED = 1
ACTION_NOT_ALLOWED = 2
REJECTED = 3

# Detail codes carried in `data` of a REJECTED error.
NOT_FOUND = 100
VALUE_TOO_LOW = 105
TIMEOUT = 106
CONFLICT = 107
INSUFFICIENT_BALANCE = 1001
NEGATIVE_AMOUNT = 1002
INVALID_PUBKEYS = 1003
BROKEN_ENCODING = 1005
NOT_A_NUMBER = 1008
BAD_SIGNATURE = 1017
NOT_ALLOWED_AT_STATE = 1018
# paychan's own detail code: the payee's handler raised; the payment was refunded.
HANDLER_FAILED = 1100


class PaychanError(Exception):
    """Base of every paychan error. `code` is the JSON-RPC code; `detail` the REJECTED sub-code."""

    code: ClassVar[int] = REJECTED
    detail: ClassVar[int | None] = None
    title: ClassVar[str] = "Rejected"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.title
        super().__init__(self.message)

    @property
    def data(self) -> list[dict[str, Any]] | None:
        if self.detail is None:
            return None
        return [{"code": self.detail, "message": self.message}]

    def to_wire(self) -> dict[str, Any]:
        """The JSON-RPC error object (also how errors travel between peers)."""
        out: dict[str, Any] = {"code": self.code, "message": self.title}
        if self.detail is not None:
            out["data"] = self.data
        else:
            out["message"] = self.message
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class ParseError(PaychanError):
    code, detail, title = PARSE_ERROR, None, "Parse error"


class InvalidRequest(PaychanError):
    code, detail, title = INVALID_REQUEST, None, "Invalid request"


class MethodNotFound(PaychanError):
    code, detail, title = METHOD_NOT_FOUND, None, "Method not found"


class InvalidParams(PaychanError):
    code, detail, title = INVALID_PARAMS, None, "Invalid params"


class InternalError(PaychanError):
    code, detail, title = INTERNAL_ERROR, None, "Internal error"


class Unauthorized(PaychanError):
    code, detail, title = UNAUTHORIZED, None, "Unauthorized"


class ActionNotAllowed(PaychanError):
    code, detail, title = ACTION_NOT_ALLOWED, None, "Action not allowed"


class Rejected(PaychanError):
    # Annotated: a bare `detail = None` would make mypy type every subclass's detail as None.
    code: ClassVar[int] = REJECTED
    detail: ClassVar[int | None] = None
    title: ClassVar[str] = "Rejected"


class NotFound(Rejected):
    detail, title = NOT_FOUND, "Doesn't exist"


class ValueTooLow(Rejected):
    detail, title = VALUE_TOO_LOW, "Value too low"


class Timeout(Rejected):
    detail, title = TIMEOUT, "Timeout"


class Conflict(Rejected):
    detail, title = CONFLICT, "Conflict"


class InsufficientBalance(Rejected):
    detail, title = INSUFFICIENT_BALANCE, "Insufficient balance"


class NegativeAmount(Rejected):
    detail, title = NEGATIVE_AMOUNT, "Negative amount"


class InvalidPubkeys(Rejected):
    detail, title = INVALID_PUBKEYS, "Invalid pubkeys"


class BrokenEncoding(Rejected):
    detail, title = BROKEN_ENCODING, "Broken encoding"


class NotANumber(Rejected):
    detail, title = NOT_A_NUMBER, "Not a number"


class BadSignature(Rejected):
    detail, title = BAD_SIGNATURE, "Bad signature"


class NotAllowedAtState(Rejected):
    detail, title = NOT_ALLOWED_AT_STATE, "Not allowed at current channel state"


class DecodeError(BrokenEncoding):
    """Malformed bytes or a message that does not match its schema. The only codec error."""


class LocalProtocolError(NotAllowedAtState):
    """Our own misuse of the state machine: an input the current phase cannot take."""


class RemoteProtocolError(Rejected):
    """The peer sent something the protocol forbids; raised at one receive point."""


class HandlerError(Rejected):
    """The payee's payment handler failed; the payment was refunded."""

    detail, title = HANDLER_FAILED, "Handler failed"


class StorageError(InternalError):
    """The store cannot serve: newer schema, map full, corrupt record."""

    title = "Storage error"


_BY_DETAIL: dict[int, type[PaychanError]] = {
    cls.detail: cls
    for cls in (NotFound, ValueTooLow, Timeout, Conflict, InsufficientBalance, NegativeAmount,
                InvalidPubkeys, BrokenEncoding, NotANumber, BadSignature, NotAllowedAtState,
                HandlerError)
    if cls.detail is not None
}
_BY_CODE: dict[int, type[PaychanError]] = {
    cls.code: cls
    for cls in (ParseError, InvalidRequest, MethodNotFound, InvalidParams, InternalError,
                Unauthorized, ActionNotAllowed, Rejected)
}


def from_wire(obj: Any) -> PaychanError:
    """Rebuild an error from its wire object; unknown shapes become a plain Rejected."""
    if not isinstance(obj, dict):
        return Rejected(str(obj))
    code = obj.get("code")
    data = obj.get("data")
    if code == REJECTED and isinstance(data, list) and data and isinstance(data[0], dict):
        sub = data[0].get("code")
        msg = data[0].get("message")
        cls = _BY_DETAIL.get(sub) if isinstance(sub, int) else None
        return (cls or Rejected)(msg if isinstance(msg, str) else None)
    cls2 = _BY_CODE.get(code) if isinstance(code, int) else None
    msg2 = obj.get("message")
    return (cls2 or Rejected)(msg2 if isinstance(msg2, str) else None)
