"""Seeded synthetic trade tape: regimes, bursts, heavy-tailed sizes, sweeping parent orders,
and a planted, lookahead-free order-flow signal. Pure numpy (polars for ``tape``), no bytewax.

Per instrument the tape is generated minute by minute. Minute ``m`` draws from a generator
seeded by (seed, instrument, m) and from a tiny carried state (price, regime, informed flow,
next id), so the tape is deterministic and can resume from any minute.

- Regimes (Markov, sticky): RANGE (mean-reverting), TREND (drift up or down), VOLATILE (high
  volatility and activity).
- Bursts: some minutes carry several times the usual activity, packed into a few seconds.
- Sizes: Pareto-tailed notionals; large orders sweep several price levels, i.e. several fills
  with the same ts and side (one parent order).
- Signal: "informed" orders lean with a persistent flow state; that state moves the *next*
  minute's drift. Large-order flow therefore predicts the next minutes (as pros should), and
  small orders chase the last move (as amateurs do). ``state_path`` exports that state per
  minute and ``oracle_probabilities`` turns it into the best possible label probabilities.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from operators.perp import PerpUpdate
from operators.records import HOUR_MS, MINUTE_MS

RANGE, TREND, VOLATILE = 0, 1, 2
REGIME_NAMES = {RANGE: "range", TREND: "trend", VOLATILE: "volatile"}

# per-minute log-volatility and activity multiplier per regime
_VOL = {RANGE: 0.0007, TREND: 0.0009, VOLATILE: 0.0028}
_ACTIVITY = {RANGE: 1.0, TREND: 1.3, VOLATILE: 2.5}
_STAY = 0.985  # chance to keep the regime from one minute to the next

# The planted signal: an AR(1) informed-flow state f with stationary sd 1, drawn at the end of each
# minute. Informed orders of that minute lean with it (P(buy) = sigmoid(INFORMED_LEAN * f)) and it
# moves the NEXT minute's drift by FLOW_DRIFT * f. Persistent (half-life ~14 minutes), so a 5m bar's
# pro-cohort imbalance (s_top, correlation ~0.85 with f at the bar's close) says where the next
# 15 minutes lean: E[log return | f] ~ 0.0064 f, against ~0.003-0.011 of noise. Strong enough that
# a working pipeline beats the class prior clearly (bench/oracle_edge.py measures how much of the
# oracle's edge the models capture); a broken one (features shifted, labels misaligned) does not.
FLOW_PERSIST = 0.95
FLOW_NOISE = float(np.sqrt(1.0 - FLOW_PERSIST ** 2))
FLOW_DRIFT = 0.0006
INFORMED_SHARE = 0.12
INFORMED_LEAN = 3.0
TREND_DRIFT = 0.0004  # per minute, in the trend's direction
TRADES_PER_ORDER = 1.3  # trades per parent order in calm minutes (sizes batches; busier regimes trade up to 2.5x as much: 1.7-2.2 on average over 48 h)
RANGE_PULL = 0.05  # per minute, share of the log distance to the range's anchor


@dataclass(frozen=True)
class InstrumentSpec:
    symbol: str
    price: float
    tick: float
    rate: float  # mean trades (parent orders) per second
    min_amount: float
    edge: float = 1.0  # scales every predictable drift (informed flow, trend, range pull); 0: a martingale


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


def _advance(spec: InstrumentSpec, seed: int, st: GenState) -> tuple[np.random.Generator, dict]:
    """The state part of minute ``st.minute``: regime switch, drift, the minute's return and the new
    informed-flow state, drawn first from the minute's generator (which is returned, positioned
    for the trades). ``generate_minute`` and ``state_path`` share it, so the exported state is the
    one that made the tape."""
    rng = _rng(seed, spec.symbol, st.minute)
    regime, trend_sign, anchor = st.regime, st.trend_sign, st.anchor
    if rng.random() > _STAY:
        regime = int(rng.integers(0, 3))
        trend_sign = 1.0 if rng.random() < 0.5 else -1.0
        anchor = st.price
    vol = _VOL[regime]
    drift = minute_drift(regime, trend_sign, st.price, anchor, st.flow, spec.edge)
    ret = drift + vol * rng.standard_normal()
    flow = FLOW_PERSIST * st.flow + FLOW_NOISE * rng.standard_normal()
    return rng, {"regime": regime, "trend_sign": trend_sign, "anchor": anchor, "vol": vol, "drift": drift,
                 "ret": ret, "flow": flow}


def minute_drift(regime, trend_sign, price, anchor, flow, edge: float = 1.0):
    """Expected log return of a minute given the state entering it (numpy-vectorised): the informed
    flow of the minute before, plus the regime's pull (trend, or reversion to the range's anchor),
    all scaled by ``edge`` (``InstrumentSpec.edge``)."""
    regime = np.asarray(regime)
    d = FLOW_DRIFT * np.asarray(flow, dtype=float)
    d = d + np.where(regime == TREND, TREND_DRIFT * np.asarray(trend_sign, dtype=float), 0.0)
    d = d - np.where(regime == RANGE, RANGE_PULL * np.log(np.asarray(price, dtype=float) / np.asarray(anchor, dtype=float)), 0.0)
    d = d * edge
    return float(d) if d.ndim == 0 else d


def generate_minute(spec: InstrumentSpec, seed: int, start_ms: int, st: GenState) -> tuple[dict, GenState]:
    """Trades of minute ``st.minute``: columns ts, id, price, amount, is_buy, offset (numpy)."""
    rng, a = _advance(spec, seed, st)
    regime, trend_sign, anchor, vol, ret, flow = (a["regime"], a["trend_sign"], a["anchor"], a["vol"], a["ret"],
                                                   a["flow"])
    p0, p1 = st.price, st.price * float(np.exp(ret))

    burst = rng.random() < 0.04
    lam = spec.rate * 60.0 * _ACTIVITY[regime] * (rng.uniform(3, 8) if burst else 1.0)
    n = int(rng.poisson(lam))
    base = st.minute * MINUTE_MS + start_ms
    if n == 0:
        empty = {k: np.empty(0, dtype=t) for k, t in
                 (("ts", np.int64), ("id", np.int64), ("price", float), ("amount", float),
                  ("is_buy", bool), ("offset", np.int64))}
        return empty, replace(st, minute=st.minute + 1, price=p1, anchor=anchor, regime=regime,
                               trend_sign=trend_sign, flow=flow, last_ret=ret)
    if burst:  # most of a burst lands inside a few seconds
        centre = rng.integers(0, MINUTE_MS - 5_000)
        inside = rng.random(n) < 0.7
        t = np.where(inside, centre + rng.integers(0, 5_000, n), rng.integers(0, MINUTE_MS, n))
    else:
        t = rng.integers(0, MINUTE_MS, n)
    t.sort()
    # price path: Brownian bridge from p0 to p1 sampled at the order times
    frac = t / MINUTE_MS
    walk = np.cumsum(rng.standard_normal(n)) * vol / np.sqrt(max(n, 1))
    bridge = walk - frac * walk[-1]
    mid = p0 * np.exp(frac * ret + bridge)

    informed = rng.random(n) < INFORMED_SHARE
    size = (rng.pareto(1.5, n) + 1.0) * spec.min_amount * np.where(informed, 6.0, 1.0)
    p_buy_informed = 1.0 / (1.0 + np.exp(-INFORMED_LEAN * flow))
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


FUNDING_EVERY_MS = 8 * HOUR_MS  # funding times: 00:00, 08:00, 16:00 UTC
OI_EVERY_MINUTES = 5


def perp_minute(spec: InstrumentSpec, seed: int, start_ms: int, before: GenState, after: GenState,
                trade_ts: np.ndarray, exchange: str) -> list[PerpUpdate]:
    """Perp data of minute ``before.minute`` (seeded by (seed, instrument, minute), apart from the
    trades' generator, so the trade tape is the same with or without it):

    - a funding update near the minute's end: the rate leans with the informed flow (crowded buyers
      pay), mark = last price x (1 + rate / 2 + noise), index = last price;
    - open interest every 5 minutes, growing with the flow and with volatile regimes;
    - liquidations, more of them after a large move, mostly against the move (a fall liquidates longs).

    ``seq`` places each update among the instrument's trades: after the trades of the minute with a
    ts at or before its own (``trade_ts``: that minute's trade times)."""
    m = before.minute
    rng = np.random.default_rng([seed, zlib.crc32(spec.symbol.encode()), m, 0x9E37])
    base = start_ms + m * MINUTE_MS
    last = after.price

    def seq(ts: int) -> int:
        return before.offset + int(np.searchsorted(trade_ts, ts, side="right"))

    out = []
    ts = base + 59_000 + int(rng.integers(0, 1_000))
    rate = float(np.clip(1e-4 + 3e-4 * np.tanh(0.6 * after.flow) + rng.normal(0, 2e-5), -0.0075, 0.0075))
    out.append(PerpUpdate(kind="funding", exchange=exchange, symbol=spec.symbol, ts=ts, rate=rate,
                          funding_time=(ts // FUNDING_EVERY_MS + 1) * FUNDING_EVERY_MS,
                          mark_price=last * (1 + rate / 2 + float(rng.normal(0, 5e-5))), index_price=last,
                          source="synthetic", seq=seq(ts)))
    if m % OI_EVERY_MINUTES == 0:
        ts = base + 30_000
        oi = spec.rate * 3_600 * spec.min_amount * 40 * float(np.exp(0.15 * after.flow + 0.2 * (after.regime == VOLATILE)
                                                                    + rng.normal(0, 0.01)))
        out.append(PerpUpdate(kind="open_interest", exchange=exchange, symbol=spec.symbol, ts=ts, open_interest=oi,
                              oi_value=oi * last, source="synthetic", seq=seq(ts)))
    vol = _VOL[after.regime]
    shock = abs(after.last_ret) / vol
    n = int(rng.poisson(0.03 + 2.0 * max(0.0, shock - 1.5)))
    for t in np.sort(rng.integers(0, MINUTE_MS, n)):
        down = after.last_ret < 0
        side = "sell" if (down if rng.random() < 0.85 else not down) else "buy"
        price = last * (1 + float(rng.normal(0, vol / 3)))
        amount = float(np.round((rng.pareto(1.5) + 1.0) * spec.min_amount * 20, 8))
        ts = base + int(t)
        out.append(PerpUpdate(kind="liquidation", exchange=exchange, symbol=spec.symbol, ts=ts, side=side,
                              price=price, amount=amount, source="synthetic", seq=seq(ts)))
    return out


def generate(spec: InstrumentSpec, seed: int, start_ms: int, minutes: int,
             st: GenState | None = None) -> tuple[dict, GenState]:
    """``minutes`` consecutive minutes at once (concatenated columns)."""
    st = st or initial_state(spec)
    parts = []
    for _ in range(minutes):
        cols, st = generate_minute(spec, seed, start_ms, st)
        parts.append(cols)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, st


def tape(symbols: list[str], seed: int, start_ms: int, minutes: int, *, rate: float | None = None,
         exchange: str = "synthetic", jitter_ms: int = 0) -> pl.DataFrame:
    """The trades of several instruments as one tape in the trade contract's columns (exchange,
    symbol, id, ts, price, amount, side), merged in arrival order: by ts, or with ``jitter_ms``
    reordered by up to that many ms without making any trade late."""
    frames = []
    for sym in symbols:
        cols, _ = generate(spec_for(sym, rate), seed, start_ms, minutes)
        frames.append(pl.DataFrame(cols).with_columns(pl.lit(exchange).alias("exchange"), pl.lit(sym).alias("symbol")))
    df = pl.concat(frames)
    arrival = df["ts"].to_numpy()
    if jitter_ms:
        arrival = arrival + np.random.default_rng(seed).integers(0, jitter_ms + 1, df.height)
    df = df.with_columns(pl.Series("_arr", arrival)).sort("_arr", "symbol", "offset")
    return df.select(
        "exchange", "symbol", pl.col("id").cast(pl.String), "ts", "price", "amount",
        pl.when(pl.col("is_buy")).then(pl.lit("buy")).otherwise(pl.lit("sell")).alias("side"))


# --------------------------------------------------------------------------------------- oracle
#
# The generator knows what drives the next minutes; nothing in the tape says it directly. These
# export that state per minute and turn it into the best probabilities any model could give for a
# label, the reference against which the pipeline's models are measured (bench/oracle_edge.py).


def state_path(spec: InstrumentSpec, seed: int, minutes: int, st: GenState | None = None) -> dict:
    """The generator's state entering each of ``minutes`` minutes, without generating trades
    (same draws as ``generate_minute``): numpy columns ``minute``, ``price`` (the mid at the
    minute's start), ``regime``, ``trend_sign``, ``anchor``, ``flow`` (the informed-flow state,
    which sets this minute's drift), ``drift`` (this minute's true expected log return given the
    state entering it: the "next-minute drift" as of the minute's start, regime switch not
    included) and ``ret`` (the log return that happened); ``edge`` the spec's."""
    st = st or initial_state(spec)
    cols: dict[str, list] = {k: [] for k in ("minute", "price", "regime", "trend_sign", "anchor", "flow", "drift", "ret")}
    edge = spec.edge
    for _ in range(minutes):
        _, a = _advance(spec, seed, st)
        for k, v in (("minute", st.minute), ("price", st.price), ("regime", st.regime), ("trend_sign", st.trend_sign),
                     ("anchor", st.anchor), ("flow", st.flow), ("drift", a["drift"]), ("ret", a["ret"])):
            cols[k].append(v)
        st = replace(st, minute=st.minute + 1, price=st.price * float(np.exp(a["ret"])), anchor=a["anchor"],
                     regime=a["regime"], trend_sign=a["trend_sign"], flow=a["flow"], last_ret=a["ret"])
    return {**{k: np.asarray(v) for k, v in cols.items()}, "edge": edge}


def oracle_probabilities(path: dict, at_minutes, horizon_minutes: int, bands, *, paths: int = 4000,
                         seed: int = 0) -> np.ndarray:
    """[N, 3] probabilities (down, flat, up) of the label of a bar ending at the start of minute
    ``at_minutes[i]`` (its close is the price then), over ``horizon_minutes`` minutes with flat band
    ``bands[i]`` (``operators.labels``), given everything the generator knows at that moment: the
    price, regime, trend sign, anchor and informed flow (``state_path``), and nothing after it.
    Monte Carlo over ``paths`` futures drawn from the generator's own dynamics (regime switches
    included), with independent random numbers; probabilities are clipped to [1e-4, 1]."""
    at = np.asarray(at_minutes, dtype=np.int64)
    bands = np.asarray(bands, dtype=float)
    rng = np.random.default_rng(seed)
    n = len(at)
    price = np.repeat(path["price"][at], paths).astype(float)
    anchor = np.repeat(path["anchor"][at], paths).astype(float)
    regime = np.repeat(path["regime"][at], paths).astype(np.int64)
    trend = np.repeat(path["trend_sign"][at], paths).astype(float)
    flow = np.repeat(path["flow"][at], paths).astype(float)
    vols = np.array([_VOL[RANGE], _VOL[TREND], _VOL[VOLATILE]])
    logp0 = np.log(price)
    for _ in range(horizon_minutes):
        switch = rng.random(price.size) > _STAY
        new_regime = rng.integers(0, 3, price.size)
        new_sign = np.where(rng.random(price.size) < 0.5, 1.0, -1.0)
        regime = np.where(switch, new_regime, regime)
        trend = np.where(switch, new_sign, trend)
        anchor = np.where(switch, price, anchor)
        ret = minute_drift(regime, trend, price, anchor, flow, path.get("edge", 1.0)) + vols[regime] * rng.standard_normal(price.size)
        flow = FLOW_PERSIST * flow + FLOW_NOISE * rng.standard_normal(price.size)
        price = price * np.exp(ret)
    fwd = (np.log(price) - logp0).reshape(n, paths)
    b = bands[:, None]
    probs = np.stack([(fwd < -b).mean(axis=1), (np.abs(fwd) <= b).mean(axis=1), (fwd > b).mean(axis=1)], axis=1)
    probs = np.clip(probs, 1e-4, 1.0)
    return probs / probs.sum(axis=1, keepdims=True)
