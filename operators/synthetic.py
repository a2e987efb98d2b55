"""Seeded synthetic trade tape: regimes, bursts, heavy-tailed sizes, sweeping parent orders,
and a planted, lookahead-free order-flow signal. Pure numpy, no bytewax.

Per instrument the tape is generated minute by minute. Minute ``m`` draws from a generator
seeded by (seed, instrument, m) and from a tiny carried state (price, regime, informed flow,
next id), so the tape is deterministic and can resume from any minute.

- Regimes (Markov, sticky): RANGE (mean-reverting), TREND (drift up or down), VOLATILE (high
  volatility and activity).
- Bursts: some minutes carry several times the usual activity, packed into a few seconds.
- Sizes: Pareto-tailed notionals; large orders sweep several price levels, i.e. several fills
  with the same ts and side (one parent order).
- Signal: "informed" orders lean with a persistent flow state; that state moves the *next*
  minute's drift. Large-order flow therefore predicts the future a little (as pros should),
  and small orders chase the last move (as amateurs do).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

RANGE, TREND, VOLATILE = 0, 1, 2
REGIME_NAMES = {RANGE: "range", TREND: "trend", VOLATILE: "volatile"}
_MINUTE = 60_000

# per-minute log-volatility and activity multiplier per regime
_VOL = {RANGE: 0.0007, TREND: 0.0009, VOLATILE: 0.0028}
_ACTIVITY = {RANGE: 1.0, TREND: 1.3, VOLATILE: 2.5}
_STAY = 0.985  # chance to keep the regime from one minute to the next


@dataclass(frozen=True)
class InstrumentSpec:
    symbol: str
    price: float
    tick: float
    rate: float  # mean trades (parent orders) per second
    min_amount: float


DEFAULT_SPECS = {
    "BTC/USDT:USDT": InstrumentSpec("BTC/USDT:USDT", 60_000.0, 0.1, 8.0, 0.001),
    "ETH/USDT:USDT": InstrumentSpec("ETH/USDT:USDT", 3_000.0, 0.01, 6.0, 0.01),
    "SOL/USDT:USDT": InstrumentSpec("SOL/USDT:USDT", 150.0, 0.001, 4.0, 0.1),
}


def spec_for(symbol: str, rate: float | None = None) -> InstrumentSpec:
    """Known symbols get realistic prices; any other name gets a deterministic made-up one."""
    spec = DEFAULT_SPECS.get(symbol)
    if spec is None:
        h = zlib.crc32(symbol.encode())
        price = float(10 ** (h % 5)) * (1 + (h >> 8) % 9)
        spec = InstrumentSpec(symbol, price, price * 1e-5, 4.0, 10.0 / price)
    return spec if rate is None else replace(spec, rate=rate)


@dataclass(frozen=True)
class GenState:
    minute: int  # minutes since the tape's start
    price: float
    anchor: float  # RANGE regimes revert to this
    regime: int
    trend_sign: float
    flow: float  # informed flow state (AR(1)); leans informed orders now, drives drift next minute
    last_ret: float
    next_id: int
    offset: int  # position of the next trade in this instrument's tape


def initial_state(spec: InstrumentSpec) -> GenState:
    return GenState(0, spec.price, spec.price, RANGE, 1.0, 0.0, 0.0, 1, 0)


def _rng(seed: int, symbol: str, minute: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(symbol.encode()), minute])


def generate_minute(spec: InstrumentSpec, seed: int, start_ms: int, st: GenState) -> tuple[dict, GenState]:
    """Trades of minute ``st.minute``: columns ts, id, price, amount, is_buy, offset (numpy)."""
    rng = _rng(seed, spec.symbol, st.minute)
    regime, trend_sign, anchor = st.regime, st.trend_sign, st.anchor
    if rng.random() > _STAY:
        regime = int(rng.integers(0, 3))
        trend_sign = 1.0 if rng.random() < 0.5 else -1.0
        anchor = st.price
    vol = _VOL[regime]
    drift = 0.0006 * st.flow  # last minute's informed flow moves this minute
    if regime == TREND:
        drift += 0.0004 * trend_sign
    elif regime == RANGE:
        drift -= 0.05 * np.log(st.price / anchor)
    ret = drift + vol * rng.standard_normal()
    p0, p1 = st.price, st.price * float(np.exp(ret))
    flow = 0.8 * st.flow + 0.6 * rng.standard_normal()

    burst = rng.random() < 0.04
    lam = spec.rate * 60.0 * _ACTIVITY[regime] * (rng.uniform(3, 8) if burst else 1.0)
    n = int(rng.poisson(lam))
    base = st.minute * _MINUTE + start_ms
    if n == 0:
        empty = {k: np.empty(0, dtype=t) for k, t in
                 (("ts", np.int64), ("id", np.int64), ("price", float), ("amount", float),
                  ("is_buy", bool), ("offset", np.int64))}
        return empty, replace(st, minute=st.minute + 1, price=p1, anchor=anchor, regime=regime,
                               trend_sign=trend_sign, flow=flow, last_ret=ret)
    if burst:  # most of a burst lands inside a few seconds
        centre = rng.integers(0, _MINUTE - 5_000)
        inside = rng.random(n) < 0.7
        t = np.where(inside, centre + rng.integers(0, 5_000, n), rng.integers(0, _MINUTE, n))
    else:
        t = rng.integers(0, _MINUTE, n)
    t.sort()
    # price path: Brownian bridge from p0 to p1 sampled at the order times
    frac = t / _MINUTE
    walk = np.cumsum(rng.standard_normal(n)) * vol / np.sqrt(max(n, 1))
    bridge = walk - frac * walk[-1]
    mid = p0 * np.exp(frac * ret + bridge)

    informed = rng.random(n) < 0.12
    size = (rng.pareto(1.5, n) + 1.0) * spec.min_amount * np.where(informed, 6.0, 1.0)
    p_buy_informed = 1.0 / (1.0 + np.exp(-1.5 * flow))
    p_buy_chaser = 1.0 / (1.0 + np.exp(-400.0 * st.last_ret))
    is_buy = rng.random(n) < np.where(informed, p_buy_informed, p_buy_chaser)

    # large orders sweep: k fills at successive ticks, same ts and side
    k = np.clip(np.floor(np.log2(np.maximum(size / (20 * spec.min_amount), 1.0))).astype(np.int64) + 1, 1, 5)
    order_of_fill = np.repeat(np.arange(n), k)
    level = np.arange(len(order_of_fill)) - np.repeat(np.cumsum(k) - k, k)
    sign = np.where(is_buy, 1.0, -1.0)[order_of_fill]
    half = spec.tick * 0.5
    px = mid[order_of_fill] + sign * (half + level * spec.tick)
    tick_decimals = max(0, int(-np.floor(np.log10(spec.tick))) + 1)
    px = np.round(np.maximum(np.round(px / spec.tick) * spec.tick, spec.tick), tick_decimals)
    amount = (size / k)[order_of_fill]
    decimals = max(0, int(-np.floor(np.log10(spec.min_amount))) + 2)
    amount = np.maximum(np.round(amount, decimals), 10.0 ** -decimals)
    m = len(order_of_fill)
    cols = {
        "ts": base + t[order_of_fill],
        "id": np.arange(st.next_id, st.next_id + m, dtype=np.int64),
        "price": px,
        "amount": amount,
        "is_buy": is_buy[order_of_fill],
        "offset": np.arange(st.offset, st.offset + m, dtype=np.int64),
    }
    nxt = replace(st, minute=st.minute + 1, price=p1, anchor=anchor, regime=regime, trend_sign=trend_sign, flow=flow,
                  last_ret=ret, next_id=st.next_id + m, offset=st.offset + m)
    return cols, nxt


def generate(spec: InstrumentSpec, seed: int, start_ms: int, minutes: int,
             st: GenState | None = None) -> tuple[dict, GenState]:
    """``minutes`` consecutive minutes at once (concatenated columns)."""
    st = st or initial_state(spec)
    parts = []
    for _ in range(minutes):
        cols, st = generate_minute(spec, seed, start_ms, st)
        parts.append(cols)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, st
