"""Unit tests for dataflows/logs.py: JSON log lines and secret redaction (every pattern), registered
secret values (also inside other text), Settings/DSN/environment registration, no false positives,
idempotent setup."""

from __future__ import annotations

import io
import json
import logging

import pytest
from pydantic import SecretStr

from dataflows import logs
from dataflows.config import load_settings
from dataflows.logs import MASK, redact_text, register_secret, setup_logging


@pytest.fixture(autouse=True)
def clean_logging(monkeypatch):
    """Each test starts with no registered secret and leaves the root logger as it found it."""
    for k in list(__import__("os").environ):
        if k.startswith("TAPEFLOW_"):
            monkeypatch.delenv(k)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {id(h): list(h.filters) for h in root.handlers})
    logs.clear_secrets()
    yield
    for h in list(root.handlers):
        if h not in saved[0]:
            root.removeHandler(h)
    for h in saved[0]:
        h.filters[:] = saved[2][id(h)]
    root.setLevel(saved[1])
    logs.clear_secrets()


@pytest.fixture
def capture():
    """setup_logging into a buffer; returns a function giving the JSON records written so far."""
    buf = io.StringIO()
    setup_logging("DEBUG", json=True, stream=buf)

    def records() -> list[dict]:
        return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]

    records.buf = buf
    return records


def test_json_shape(capture):
    logging.getLogger("tapeflow.x").warning("hello %s, %d bars", "world", 3, extra={"symbol": "BTC", "n": 5})
    [rec] = capture()
    assert set(rec) == {"ts", "level", "logger", "msg", "symbol", "n"}
    assert rec["msg"] == "hello world, 3 bars"
    assert (rec["level"], rec["logger"], rec["symbol"], rec["n"]) == ("WARNING", "tapeflow.x", "BTC", 5)
    assert rec["ts"].endswith("Z") and rec["ts"][10] == "T" and len(rec["ts"]) == len("2024-01-01T00:00:00.000Z")


def test_exception_is_a_field_and_redacted(capture):
    try:
        raise RuntimeError("cannot connect to http://admin:s3cr3t-pw@db:8123 with token=abcd1234")
    except RuntimeError:
        logging.getLogger("t").exception("failed")
    [rec] = capture()
    assert rec["msg"] == "failed" and "RuntimeError" in rec["exc"] and "Traceback" in rec["exc"]
    assert "s3cr3t-pw" not in rec["exc"] and "abcd1234" not in rec["exc"]
    assert "http://admin:***@db:8123" in rec["exc"] and "token=***" in rec["exc"]


def test_levels_below_the_configured_one_are_dropped():
    buf = io.StringIO()
    setup_logging("WARNING", stream=buf)
    logging.getLogger("t").info("quiet")
    logging.getLogger("t").error("loud")
    assert [json.loads(x)["msg"] for x in buf.getvalue().splitlines()] == ["loud"]


@pytest.mark.parametrize("name", ["api_key", "apikey", "API_KEY", "secret", "client_secret", "password", "passwd",
                                  "db_password", "token", "access_token", "private", "private_key", "key",
                                  "Authorization"])
def test_every_sensitive_name_is_masked_in_dict_args_extra_and_text(capture, name):
    value = "v4lue-" + name.lower()
    log = logging.getLogger("t")
    log.info("dict %s", {name: value, "symbol": "BTC"})          # a dict argument
    log.info("%(" + name + ")s and %(symbol)s", {name: value, "symbol": "ETH"})  # a mapping as the args
    log.info("extra", extra={name: value, "nested": {name: value, "ok": 1}})
    log.info(f"text {name}={value} and {name}: {value}")
    log.info(f'json {{"{name}": "{value}", "n": 2}}')
    recs = capture()
    assert value not in capture.buf.getvalue()
    assert recs[0]["msg"] == f"dict {{'{name}': '***', 'symbol': 'BTC'}}"
    assert recs[1]["msg"] == "*** and ETH"
    assert recs[2][name] == MASK and recs[2]["nested"] == {name: MASK, "ok": 1}
    assert recs[3]["msg"] == f"text {name}=*** and {name}: ***"
    assert recs[4]["msg"] == f'json {{"{name}": "***", "n": 2}}'


@pytest.mark.parametrize("text, expected", [
    ("connect api_key=abc123&symbol=BTC", "connect api_key=***&symbol=BTC"),
    ("url https://h/x?token=t0k3n&limit=5", "url https://h/x?token=***&limit=5"),
    ("Authorization: Bearer eyJhbGciOi.x.y rest", "Authorization: Bearer *** rest"),
    ("{'password': 'p@ss', 'user': 'bob'}", "{'password': '***', 'user': 'bob'}"),
    ('{"apiKey":"AKIA123","region":"eu"}', '{"apiKey":"***","region":"eu"}'),
    ('"secret": 12345, "n": 1', '"secret": ***, "n": 1'),
    ("dsn http://user:pw1234@host:8123/db", "dsn http://user:***@host:8123/db"),
    ("kafka sasl://svc:Zx9%2Fq@broker:9093 up", "kafka sasl://svc:***@broker:9093 up"),
    ("PRIVATE_KEY=-----BEGIN", "PRIVATE_KEY=***"),
])
def test_text_patterns(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize("text", [
    "the key point is the monkey's token of appreciation; password policies are private matters",
    "trade 42 on BTC/USDT:USDT at 43,210.5 (buy), bar 2024-01-01T00:05:00Z closed",
    "store tapeflow @ chdb:///var/lib/tapeflow/clickhouse",
    "user@example.com wrote ssh://git@github.com/a/b.git",
    "ratio=0.5 side: buy notional=5000.0 http://localhost:8123/db",
])
def test_no_false_positives(text):
    assert redact_text(text) == text


def test_registered_secret_is_masked_anywhere(capture):
    register_secret("Zq81-planted-value")
    register_secret(SecretStr("another-SecretStr-value"))
    log = logging.getLogger("t")
    log.info("prefixZq81-planted-valuesuffix and (another-SecretStr-value)")
    log.info("arg %s", "x Zq81-planted-value y", extra={"note": ["in a list: Zq81-planted-value"]})
    log.warning("url-encoded %s", "Zq81-planted-value".replace("-", "%2D"))
    out = capture.buf.getvalue()
    assert "Zq81-planted-value" not in out and "another-SecretStr-value" not in out
    recs = capture()
    assert recs[0]["msg"] == "prefix***suffix and (***)"
    assert recs[1]["msg"] == "arg x *** y" and recs[1]["note"] == ["in a list: ***"]


def test_registered_url_encoded_secret_is_masked():
    register_secret("p@ss/word:1")
    assert redact_text("dsn http://u:p%40ss%2Fword%3A1@h") == "dsn http://u:***@h"
    assert redact_text("raw p@ss/word:1 here") == "raw *** here"


def test_short_values_are_not_registered():
    register_secret("ab")
    register_secret("")
    register_secret(None)
    assert logs.registered_secrets() == ()
    assert redact_text("ab cd") == "ab cd"


def test_settings_secrets_are_registered(tmp_path):
    dsn = "http://default:Settings-Pw-9931@clickhouse:8123/?secure=0&password_hint=Hint-Value-77"
    s = load_settings(data_dir=str(tmp_path), clickhouse_dsn=dsn)
    logs.register_settings_secrets(s)
    text = redact_text(f"opened {s.dsn()} as Settings-Pw-9931 with Hint-Value-77")
    assert "Settings-Pw-9931" not in text and "Hint-Value-77" not in text
    assert "clickhouse:8123" in text  # the host stays readable


def test_a_secret_str_that_is_not_a_url_is_registered_whole():
    class S:
        model_fields = {"token": None, "name": None, "api_key": None}
        token = SecretStr("whole-token-value")
        name = "ordinary-name"
        api_key = "plain-str-key-value"

    logs.register_settings_secrets(S())
    assert set(logs.registered_secrets()) >= {"whole-token-value", "plain-str-key-value"}
    assert "ordinary-name" not in logs.registered_secrets()


def test_env_secrets_registered_by_setup_logging(monkeypatch):
    monkeypatch.setenv("TAPEFLOW_LLM_API_KEY", "env-llm-key-5521")
    monkeypatch.setenv("TAPEFLOW_BINANCEUSDM_SECRET", "env-binance-secret-77")
    monkeypatch.setenv("TAPEFLOW_CLICKHOUSE_DSN", "http://u:env-dsn-pw-88@h:8123")
    monkeypatch.setenv("TAPEFLOW_KAFKA_TOPIC", "trades-topic-name")
    buf = io.StringIO()
    setup_logging(stream=buf)
    logging.getLogger("t").info("values env-llm-key-5521 env-binance-secret-77 env-dsn-pw-88 trades-topic-name")
    msg = json.loads(buf.getvalue())["msg"]
    assert msg == "values *** *** *** trades-topic-name"


def test_setup_is_idempotent_and_text_mode_redacts_too():
    root = logging.getLogger()
    before = len(root.handlers)
    a, b = io.StringIO(), io.StringIO()
    setup_logging("INFO", stream=a)
    setup_logging("INFO", stream=b)
    setup_logging("INFO", json=False, stream=b)
    assert len(root.handlers) == before + 1
    logging.getLogger("t").info("once password=hunter22")
    assert a.getvalue() == ""
    line = b.getvalue().strip()
    assert line.count("once") == 1 and line.endswith("INFO t: once password=***") and "hunter22" not in line


def test_other_root_handlers_get_the_filter():
    other = io.StringIO()
    h = logging.StreamHandler(other)
    logging.getLogger().addHandler(h)
    setup_logging("INFO", stream=io.StringIO())
    logging.getLogger("t").info("token=visible-before")
    assert "visible-before" not in other.getvalue() and "token=***" in other.getvalue()


def test_a_broken_format_string_is_still_logged_redacted(capture):
    logging.getLogger("t").info("two %s %s", "api_key=zz-broken-99")
    out = capture.buf.getvalue()
    assert "zz-broken-99" not in out and len(capture()) == 1
