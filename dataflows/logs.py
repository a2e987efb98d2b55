"""Structured logs with secret redaction (secrets come only from the environment; a redaction
filter on logging keeps them out of every log line).

``setup_logging(level, json=True)`` puts one handler on the root logger: a JSON line per record
(``ts``, ``level``, ``logger``, ``msg``, then any ``extra`` fields, ``exc`` for a traceback) and a
``RedactionFilter`` that, before anything is formatted, masks

- the value of every field whose NAME looks secret (contains key, secret, password, passwd, token,
  api_key, apikey, private, authorization or credential; case-insensitive): in dict arguments,
  in ``extra`` fields (nested dicts too) and in ``name=value`` / ``name: value`` /
  ``"name": "value"`` / ``'name': 'value'`` patterns inside the message and the traceback;
- every registered secret value wherever it occurs (``register_secret``; Settings' ``SecretStr``
  values through ``register_settings_secrets``, secret-named ``TAPEFLOW_*`` environment variables
  through ``register_env_secrets``, which ``setup_logging`` calls);
- the password of a URL with credentials (``scheme://user:pw@host`` -> ``scheme://user:***@host``).

>>> import io, logging
>>> buf = io.StringIO()
>>> _ = setup_logging("INFO", stream=buf)
>>> logging.getLogger("demo").info("login api_key=abc123 to http://bob:hunter2@db:8123")
>>> '"msg": "login api_key=*** to http://bob:***@db:8123"' in buf.getvalue()
True

The registry of secret values is process-wide (a logging concern, not dataflow state).
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import logging
import os
import re
import sys
import threading
from typing import Any, Mapping, Optional, TextIO
from urllib.parse import parse_qsl, quote, unquote, urlsplit

MASK = "***"
SENSITIVE_WORDS = ("key", "secret", "password", "passwd", "token", "api_key", "apikey", "private",
                   "authorization", "credential")
MIN_SECRET_LEN = 4  # shorter registered values would mask ordinary text; they are not registered

_WORDS = "|".join(re.escape(w) for w in SENSITIVE_WORDS)
_SENSITIVE_NAME = re.compile(_WORDS, re.I)

# scheme://user:password@ -> scheme://user:***@
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):(?P<pw>[^\s@/]*)@")

# name=value, name: value, "name": "value", 'name': 'value' (the name contains a sensitive word)
_PAIR = re.compile(
    r"""(?P<name>(?P<q>["']?)[A-Za-z0-9_.\-]*(?:""" + _WORDS + r""")[A-Za-z0-9_.\-]*(?P=q))"""
    r"""(?P<sep>\s*[=:]\s*)"""
    r"""(?P<value>(?P<scheme>(?:bearer|basic|token)\s+)[^\s,;&'"}\])]+"""  # Authorization: Bearer abc
    r"""|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'"""                # quoted
    r"""|[^\s,;&'"}\])]+)""",                                  # bare, up to a delimiter
    re.I,
)

_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_sorted: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# the registry of secret values
# --------------------------------------------------------------------------------------------

def is_sensitive(name: Any) -> bool:
    """Whether a field called ``name`` holds a secret (its value is masked)."""
    return isinstance(name, str) and bool(_SENSITIVE_NAME.search(name))


def _plain(value: Any) -> Optional[str]:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)  # pydantic SecretStr / SecretBytes
    if callable(getter):
        value = getter()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def register_secret(value: Any) -> None:
    """Mask this value (a str or a ``SecretStr``) wherever it appears in a log record from now on.
    Values shorter than ``MIN_SECRET_LEN`` characters are ignored (they would mask ordinary text)."""
    global _secrets_sorted
    text = _plain(value)
    if not text or len(text.strip()) < MIN_SECRET_LEN:
        return
    forms = {text, quote(text, safe=""), quote(text, safe="/:")}
    with _lock:
        _secrets.update(f for f in forms if len(f) >= MIN_SECRET_LEN)
        _secrets_sorted = tuple(sorted(_secrets, key=len, reverse=True))  # longest first


def registered_secrets() -> tuple[str, ...]:
    return _secrets_sorted


def clear_secrets() -> None:
    """Forget every registered value (tests)."""
    global _secrets_sorted
    with _lock:
        _secrets.clear()
        _secrets_sorted = ()


def register_dsn(dsn: Any) -> None:
    """Register the secret parts of a URL/DSN: its password and the values of secret-named query
    parameters (``?password=...``). The rest of the DSN (host, path) stays readable."""
    text = _plain(dsn)
    if not text:
        return
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return
    if password:
        register_secret(password)
        register_secret(unquote(password))
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if is_sensitive(name):
            register_secret(value)


def _looks_like_url(text: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", text))


def register_settings_secrets(settings: Any) -> None:
    """Register every secret of a Settings object: each ``SecretStr`` field (a URL-shaped one by its
    password and secret query parameters, anything else as a whole) and each str field with a
    secret-looking name."""
    fields = getattr(type(settings), "model_fields", None) or {}
    for name in fields:
        value = getattr(settings, name, None)
        if value is None:
            continue
        if callable(getattr(value, "get_secret_value", None)):
            text = _plain(value)
            if text and _looks_like_url(text):
                register_dsn(text)
            else:
                register_secret(text)
        elif isinstance(value, str) and is_sensitive(name):
            register_secret(value)


def register_env_secrets(environ: Optional[Mapping[str, str]] = None, prefix: str = "TAPEFLOW_") -> None:
    """Register the values of environment variables (with ``prefix``) whose name looks secret
    (``TAPEFLOW_LLM_API_KEY``, ``TAPEFLOW_BINANCEUSDM_SECRET``...), and the password of any of
    them that holds a URL with credentials (``TAPEFLOW_CLICKHOUSE_DSN``)."""
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if not name.startswith(prefix) or not value:
            continue
        if is_sensitive(name[len(prefix):]):
            if _looks_like_url(value):
                register_dsn(value)
            else:
                register_secret(value)
        elif _looks_like_url(value):
            register_dsn(value)


# --------------------------------------------------------------------------------------------
# redaction
# --------------------------------------------------------------------------------------------

def _mask_pair(m: re.Match) -> str:
    value = m.group("value")
    if m.group("scheme"):
        return m.group("name") + m.group("sep") + m.group("scheme") + MASK
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        masked = value[0] + MASK + value[0]
    else:
        masked = MASK
    return m.group("name") + m.group("sep") + masked


def redact_text(text: Any) -> str:
    """``text`` with registered secrets, URL passwords and secret ``name=value`` values masked."""
    if not isinstance(text, str):
        text = str(text)
    for secret in _secrets_sorted:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_CREDENTIALS.sub(lambda m: m.group("head") + ":" + MASK + "@", text)
    return _PAIR.sub(_mask_pair, text)


def redact_value(value: Any, name: Any = None) -> Any:
    """A value about to be logged: masked when its field name looks secret; dicts by key and
    sequences item by item; strings through ``redact_text``; numbers and None as they are;
    other objects by their ``str``."""
    if name is not None and is_sensitive(name):
        return MASK
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [redact_value(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return redact_text(str(value))


_STANDARD_ATTRS = frozenset(logging.LogRecord("x", 0, "x", 0, "x", None, None).__dict__) | {
    "message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class RedactionFilter(logging.Filter):
    """Masks secrets in a record in place (message with its arguments, extra fields, traceback);
    never drops a record. Attach it to handlers (a logger's own filters do not see records that
    propagate from child loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_tapeflow_redacted", False):
            return True
        try:
            args = record.args
            if isinstance(args, Mapping):
                record.args = redact_value(dict(args))
            elif isinstance(args, tuple):
                record.args = tuple(redact_value(a) for a in args)
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string still gets logged, redacted
                message = f"{record.msg} {record.args!r}"
            record.msg, record.args = redact_text(message), None
            for key, value in _extra_fields(record).items():
                setattr(record, key, redact_value(value, key))
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact_text(record.exc_text)
            if record.stack_info:
                record.stack_info = redact_text(record.stack_info)
        except Exception:  # noqa: BLE001 - redaction must never break logging; say nothing secret
            record.msg, record.args = "log record withheld: redaction failed", None
            record.exc_info, record.exc_text = None, None
        record._tapeflow_redacted = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601, ms), level, logger, msg, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return _json.dumps(out, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int | str = logging.INFO, json: bool = True, stream: Optional[TextIO] = None,
                  environ: Optional[Mapping[str, str]] = None) -> logging.Handler:
    """Configure the root logger: one handler (stderr by default) with the redaction filter and
    the JSON formatter (``json=False``: a plain text line). Idempotent: calling it again replaces
    the handler it installed before. Also registers secret-named ``TAPEFLOW_*`` environment values
    and adds the redaction filter to any other handler already on the root logger."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_tapeflow_handler", False):
            root.removeHandler(h)
            h.close()
    register_env_secrets(environ)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._tapeflow_handler = True  # type: ignore[attr-defined]
    handler.addFilter(RedactionFilter())
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    for h in root.handlers:
        if not any(isinstance(f, RedactionFilter) for f in h.filters):
            h.addFilter(RedactionFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


# --------------------------------------------------------------------------------------------
# librdkafka's own log lines
# --------------------------------------------------------------------------------------------

class DebugLogger(logging.LoggerAdapter):
    """A logger that records everything at DEBUG, whatever level the caller asked for.

    For librdkafka (confluent-kafka's ``logger`` config key): without it librdkafka prints every
    failed connection attempt on stderr (~20 ``%3|...|FAIL|`` lines a second while a broker is
    down), drowning the one clear error the caller raises. Routed here they reach the log only
    with ``--debug``. confluent-kafka calls ``.log(level, fmt, *args)`` on whatever it is given."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.logger.log(logging.DEBUG, msg, *args, **kwargs)


def librdkafka_logger() -> DebugLogger:
    """The logger given to librdkafka clients (see ``DebugLogger``)."""
    return DebugLogger(logging.getLogger("tapeflow.librdkafka"), {})
