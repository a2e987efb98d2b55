"""Venue exchanges for the live feeds: making and checking ccxt.pro exchanges, the errors a feed ends with.

``make_exchange`` builds a ccxt.pro exchange with ccxt's rate limiter on (rate limits are ccxt's
job, ``enableRateLimit``) and API keys only from the environment (``TAPEFLOW_<EXCHANGE>_API_KEY``
etc., see ``credential_env_names``; never logged). ``check_exchange_id`` and ``unknown_symbols``
turn a typo into one line naming the closest valid ids or symbols. The feed's loops
(``dataflows.venue_feed`` and its backfill and perp parts) share the small asyncio helpers at the
end (``STOPPED``, ``call_maybe_async``, ``symbol_of``).
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import os
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import ccxt


#: Errors after which reconnecting (or retrying a REST call) can help.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    ccxt.NetworkError, ConnectionError, asyncio.TimeoutError, TimeoutError,
)

#: Environment variable suffix -> ccxt credential attribute.
_CREDENTIALS: Mapping[str, str] = MappingProxyType({
    "API_KEY": "apiKey",
    "SECRET": "secret",
    "PASSWORD": "password",  # okx, kucoinfutures passphrase
    "UID": "uid",
    "WALLET_ADDRESS": "walletAddress",  # hyperliquid
    "PRIVATE_KEY": "privateKey",  # hyperliquid
})


class FeedError(RuntimeError):
    """A live feed cannot do its job and retrying will not help (a user mistake such as an
    unknown symbol, a feed that failed for good, or a ``--duration`` run that received nothing).
    The message is meant for the user as is: one line per problem, naming what to fix."""


class UnknownSymbolError(FeedError):
    """A requested symbol is not among the venue's markets."""


class UnknownExchangeError(FeedError, ValueError):
    """The exchange id is not a ccxt.pro exchange (a ValueError too: it is a bad argument)."""


def check_exchange_id(exchange_id: str) -> None:
    """Raise ``UnknownExchangeError`` naming the closest valid ids unless ``exchange_id`` is a
    ccxt.pro exchange (the live feed needs websockets; a REST-only ccxt id is named as such)."""
    import ccxt.pro as ccxtpro

    pro = list(ccxtpro.exchanges)
    if exchange_id in pro:
        return
    close = difflib.get_close_matches(exchange_id.lower(), pro, n=3, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else "e.g. binanceusdm, bybit, okx, kucoinfutures, hyperliquid"
    if exchange_id in ccxt.exchanges:
        raise UnknownExchangeError(f"ccxt has {exchange_id!r} only over REST; live feeds need a ccxt.pro "
                                   f"(websocket) exchange ({hint})")
    raise UnknownExchangeError(f"unknown exchange {exchange_id!r} (not a ccxt.pro or ccxt id); {hint}")


def unknown_symbols(exchange_id: str, symbols: Sequence[str], markets: Mapping[str, Any],
                    markets_by_id: Optional[Mapping[str, Any]] = None) -> list[str]:
    """One line per symbol the venue does not list, with close matches from its markets (a venue
    id such as ``BTCUSDT`` is matched to its unified symbol, case is ignored)."""
    upper = {str(m).upper(): str(m) for m in markets}
    problems = []
    for sym in symbols:
        if sym in markets:
            continue
        hints: list[str] = []
        for m in (markets_by_id or {}).get(sym) or []:
            if isinstance(m, dict) and m.get("symbol") in markets:
                hints.append(m["symbol"])
        if sym.upper() in upper:  # only the case differs: that is the one
            hints.append(upper[sym.upper()])
        else:
            hints += [upper[u] for u in difflib.get_close_matches(sym.upper(), upper, n=3, cutoff=0.6)]
        hints = list(dict.fromkeys(hints))[:3]
        why = f"close matches: {', '.join(hints)}" if hints else f"no close match among its {len(markets)} markets"
        problems.append(f"{exchange_id} does not list {sym!r}; {why}")
    return problems


def credential_env_names(exchange_id: str) -> dict[str, str]:
    """``{"TAPEFLOW_OKX_API_KEY": "apiKey", ...}``: the variables ``make_exchange`` reads."""
    prefix = f"TAPEFLOW_{exchange_id.upper()}_"
    return {prefix + suffix: attr for suffix, attr in _CREDENTIALS.items()}


def make_exchange(exchange_id: str, env: Optional[Mapping[str, str]] = None, options: Optional[dict] = None):
    """A ccxt.pro exchange with ccxt's rate limiter on and credentials from ``env`` (default:
    ``os.environ``). Public trade streams need no keys; none are required. The caller closes it
    (``await exchange.close()``)."""
    import ccxt.pro as ccxtpro

    check_exchange_id(exchange_id)
    cls = getattr(ccxtpro, exchange_id)
    env = os.environ if env is None else env
    config: dict[str, Any] = {"enableRateLimit": True, "newUpdates": True}
    if options:
        config["options"] = dict(options)
    for name, attr in credential_env_names(exchange_id).items():
        value = env.get(name)
        if value:
            config[attr] = value
    return cls(config)


# ---------------------------------------------------------------------------------------------
# shared by the feed's loops

#: What ``CcxtFeed._until_stopped`` returns when the stop event won.
STOPPED = object()


async def call_maybe_async(cb: Callable, arg: Any) -> None:
    """Call a feed callback (a plain function or a coroutine function) with ``arg``."""
    result = cb(arg)
    if inspect.isawaitable(result):
        await result


def symbol_of(item: Any, symbols: list[str]) -> Optional[str]:
    """The symbol a ccxt structure names (a watch of one symbol may leave it out)."""
    sym = item.get("symbol") if isinstance(item, dict) else None
    sym = sym if isinstance(sym, str) else None
    return symbols[0] if sym is None and len(symbols) == 1 else sym
