"""The optional LLM summary of the daily report: an OpenAI-compatible chat endpoint configured by
``TAPEFLOW_LLM_*`` (off unless configured) that receives the day's aggregates only (counts, sums
and rates, never a trade, a symbol or a raw row)."""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from dataflows.logs import redact_text, register_dsn, register_secret

log = logging.getLogger("tapeflow.report")


@dataclass(frozen=True)
class LlmConfig:
    """An OpenAI-compatible chat endpoint: POST ``{base_url}/chat/completions``."""

    base_url: str
    model: str
    api_key: Optional[SecretStr] = None
    timeout_s: float = 30.0
    max_tokens: int = 400

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["LlmConfig"]:
        """``TAPEFLOW_LLM_BASE_URL`` + ``TAPEFLOW_LLM_MODEL`` (+ ``TAPEFLOW_LLM_API_KEY``,
        ``TAPEFLOW_LLM_TIMEOUT_S``). None (summary off) unless the base URL is set. The key and any
        password in the URL are registered with the log redaction."""
        env = os.environ if environ is None else environ
        base = (env.get("TAPEFLOW_LLM_BASE_URL") or "").strip()
        if not base:
            return None
        model = (env.get("TAPEFLOW_LLM_MODEL") or "").strip()
        if not model:
            raise ValueError("TAPEFLOW_LLM_BASE_URL is set but TAPEFLOW_LLM_MODEL is not: name the model "
                             "(or unset TAPEFLOW_LLM_BASE_URL to turn the LLM summary off)")
        key = env.get("TAPEFLOW_LLM_API_KEY") or None
        timeout = env.get("TAPEFLOW_LLM_TIMEOUT_S") or "30"
        try:
            timeout_s = float(timeout)
        except ValueError:
            raise ValueError(f"TAPEFLOW_LLM_TIMEOUT_S must be a number of seconds, got {timeout!r}") from None
        register_dsn(base)
        if key:
            register_secret(key)
        return cls(base_url=base, model=model, api_key=SecretStr(key) if key else None, timeout_s=timeout_s)


SYSTEM_PROMPT = ("You summarise one day of a paper-trading crypto strategy for its operator. You get JSON "
                 "aggregates only. Write 3 to 6 plain sentences: how the day went, what stands out "
                 "(vetoes, kill switch, low-confidence entries, model quality), nothing invented.")


def llm_request(cfg: LlmConfig, agg: Mapping) -> tuple[str, dict, bytes]:
    """The URL, headers and body that would be POSTed for these aggregates. Credentials in the base
    URL (user:pw@) are not sent; the endpoint gets ``TAPEFLOW_LLM_API_KEY`` as a bearer token."""
    parts = urlsplit(cfg.base_url.rstrip("/") + "/chat/completions")
    url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    body = json.dumps({
        "model": cfg.model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": json.dumps(agg, sort_keys=True, default=str)}],
        "temperature": 0.2, "max_tokens": cfg.max_tokens,
    }).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if cfg.api_key is not None:
        headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
    return url, headers, body


def llm_summary(cfg: LlmConfig, agg: Mapping) -> Optional[str]:
    """The model's summary of the aggregates, or None (logged) when the call fails in any way."""
    url, headers, body = llm_request(cfg, agg)
    try:
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:  # noqa: S310 - configured endpoint
            payload = json.loads(resp.read().decode("utf-8"))
        text = payload["choices"][0]["message"]["content"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the response has no message content")
        return text.strip()
    except urllib.error.HTTPError as err:
        log.warning("LLM summary failed: HTTP %s from %s", err.code, redact_text(url))
    except Exception as err:  # noqa: BLE001 - the report is written without the summary
        log.warning("LLM summary failed (%s) calling %s: %s", type(err).__name__, redact_text(url),
                    redact_text(str(err)))
    return None
