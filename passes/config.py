"""The one validation mechanism: frozen pydantic models for every option set.

Method configs (``IEEConfig``), the compile recipe, the prune, profile and bench
options all derive from :class:`Config`: fields are typed and constrained once (the
JSON schema of recipe files comes from the same declarations), unknown keys are
errors, and a bad value raises :class:`ConfigError` (a ``ValueError``) whose message
names the owner, the field and the value, e.g. ``iee: h must be >= 1, got 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Config", "ConfigError", "check_choice", "describe_errors", "short_list", "short_repr"]

C = TypeVar("C", bound="Config")

_ECHO_LIMIT = 80  # characters of a user's value echoed back in a message
_MAX_PROBLEMS = 10  # problems listed in one message (the rest are counted)
_PROBLEM_LIMIT = 500  # characters of one problem line


class ConfigError(ValueError):
    """Options that do not validate; the message names each field at fault and its value.

    ``problems`` holds one line per field; ``owner`` (the option set's name, or the file it
    came from) prefixes each of them in the message."""

    def __init__(self, message: str = "", owner: str = "", problems: list[str] | None = None):
        self.owner = owner
        self.problems = list(problems) if problems is not None else [message]
        prefix = f"{owner}: " if owner else ""
        shown = [_cut(prefix + problem, _PROBLEM_LIMIT) for problem in self.problems[:_MAX_PROBLEMS]]
        if len(self.problems) > _MAX_PROBLEMS:
            shown.append(f"and {len(self.problems) - _MAX_PROBLEMS} more problems")
        super().__init__("; ".join(shown))

    def owned_by(self, owner: str) -> ConfigError:
        """The same problems, named after ``owner`` (e.g. the file the options came from)."""
        return type(self)(owner=owner, problems=self.problems)


def short_repr(value: Any, limit: int = _ECHO_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages never echo huge values).
    Containers are cut before they are formatted, so even a value that expands to billions of
    elements is echoed in bounded time and memory."""
    return _cut(repr(_shallow(value, limit)), limit)


def short_list(values: Any, limit: int = _ECHO_LIMIT) -> str:
    """``a, b, c`` of the (string forms of the) first few ``values``, cut to ``limit`` characters."""
    shown, length = [], 0
    for value in values:
        text = _cut(str(value), limit)
        shown.append(text)
        length += len(text) + 2
        if length > limit:
            break
    return _cut(", ".join(shown), limit)


def check_choice(kind: str, value: Any, choices: Any, *, error: type[Exception] = ValueError,
                 prefix: str = "") -> Any:
    """``value`` when it is one of ``choices`` (a registry's keys, or a sequence); otherwise
    raises ``error``: ``{prefix}unknown {kind} {value!r}; valid: {choices}``. A registry's
    (mapping's) names are listed sorted, a sequence's in its own order. The one check behind
    every "a name from a registry" option (importance, criterion, distribution, cost model...)."""
    if isinstance(value, str) and value in choices:
        return value
    names = sorted(choices) if isinstance(choices, Mapping) else list(choices)
    raise error(f"{prefix}unknown {kind} {short_repr(value)}; valid: {', '.join(names)}")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shallow(value: Any, limit: int, depth: int = 3) -> Any:
    """``value`` with strings, containers and nesting cut to what ``limit`` characters can show."""
    if isinstance(value, str):
        return value[: limit + 1]
    if isinstance(value, (list, tuple, set, frozenset, dict)) and (depth == 0 or len(value) > limit // 2):
        return _Elided(type(value).__name__, len(value))
    if isinstance(value, dict):
        return {_shallow(k, limit, depth - 1): _shallow(v, limit, depth - 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_shallow(v, limit, depth - 1) for v in value)
    return value


class _Elided:
    def __init__(self, kind: str, size: int):
        self.text = f"<{kind} of {size} entries>" if size else f"<{kind}>"

    def __repr__(self) -> str:
        return self.text


def _field(loc: tuple) -> str:
    """The dotted name of ``loc``; quoted where a part is empty or has surrounding blanks (an
    option named ``''`` must not read as a word); ``value`` for the whole input."""
    if not loc:
        return "value"
    parts = [str(part) for part in loc]
    if any(not part.strip() or part != part.strip() for part in parts):
        return _cut(".".join(repr(part) for part in parts), _ECHO_LIMIT)
    return _cut(".".join(parts), _ECHO_LIMIT)


def _message(error: Mapping[str, Any], valid: list[str] | None = None) -> str:
    """One pydantic error as ``FIELD must ..., got VALUE``."""
    kind, ctx, field = error["type"], error.get("ctx") or {}, _field(error["loc"])
    got = f", got {short_repr(error['input'])}" if "input" in error else ""
    rules = {
        "greater_than_equal": lambda: f"must be >= {ctx.get('ge')}",
        "greater_than": lambda: f"must be > {ctx.get('gt')}",
        "less_than_equal": lambda: f"must be <= {ctx.get('le')}",
        "less_than": lambda: f"must be < {ctx.get('lt')}",
        "int_type": lambda: "must be an integer",
        "int_parsing": lambda: "must be an integer",
        "int_from_float": lambda: "must be an integer",
        "float_type": lambda: "must be a number",
        "float_parsing": lambda: "must be a number",
        "finite_number": lambda: "must be a finite number",
        "bool_type": lambda: "must be true or false",
        "string_type": lambda: "must be a string",
        "string_too_short": lambda: "must not be empty",
        "literal_error": lambda: f"must be one of {ctx.get('expected')}",
        "dict_type": lambda: "must be a mapping",
        "tuple_type": lambda: "must be a list",
        "list_type": lambda: "must be a list",
        "too_short": lambda: "must not be empty",
        "too_long": lambda: f"must have at most {ctx.get('max_length')} entries",
    }
    if kind == "extra_forbidden":
        return f"unknown option {field}{got}" + (f" (valid: {', '.join(valid) or 'none'})" if valid is not None else "")
    if kind == "missing":
        return f"{field} is required"
    if kind in ("value_error", "assertion_error"):
        reason = str(ctx.get("error", error["msg"]))
        return reason if field == "value" else f"{field}: {reason}"
    rule = rules.get(kind)
    return f"{field} {rule()}{got}" if rule else f"{field}: {error['msg']}{got}"


def describe_errors(exc: ValidationError, valid: list[str] | None = None) -> list[str]:
    """The errors of ``exc``, one line per field; an unknown option's line lists the ``valid`` ones."""
    return [_message(error, valid) for error in exc.errors(include_url=False)]


class Config(BaseModel):
    """A frozen, validated option set. Unknown keys are errors; ``owner`` prefixes messages."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False,
                              validate_default=False)

    owner: ClassVar[str] = ""

    @classmethod
    def label(cls) -> str:
        """How messages name this option set."""
        return cls.owner or cls.__name__

    # pydantic calls an overridden __init__ for every validation (model_validate included)
    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = describe_errors(exc, sorted(type(self).model_fields))
            raise self.error_type(owner=self.label(), problems=problems) from None

    error_type: ClassVar[type[ConfigError]] = ConfigError

    @classmethod
    def from_mapping(cls: type[C], data: Mapping[str, Any], owner: str | None = None) -> C:
        """Validate ``data`` (e.g. a parsed file); messages are prefixed with ``owner``."""
        owner = owner or cls.label()
        if not isinstance(data, Mapping):
            raise cls.error_type(f"expected a mapping of options, got {type(data).__name__}", owner=owner)
        if not all(isinstance(key, str) for key in data):
            keys = [short_repr(key) for key in data if not isinstance(key, str)]
            raise cls.error_type(f"option names must be strings, got {', '.join(keys)}", owner=owner)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise exc.owned_by(owner) from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes``, validated again (fields set stay set)."""
        return type(self)(**{**self.model_dump(exclude_unset=True), **changes})
