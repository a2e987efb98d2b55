"""operators.optimizer: search space and sampling, metrics from records, promotion gates with the
deflated Sharpe ratio, cool-off, refills, the production swap rule, off means off, snapshots.

Acceptance points of issue 6 covered here as pure logic: (2) a planted variant is promoted after
the gates, few-trade and lucky-short-run variants are not; (3) many variants on pure noise: the
naive best-Sharpe rule would promote, the deflated criterion promotes none; (4, partial) cool-off
and the audited record with both configs; (5) metrics equal an independent computation from the
records. Isolation of production is checked on real engines."""

import copy
import math
import pickle
import re
from pathlib import Path

import msgspec
import numpy as np
import pytest
from pydantic import ValidationError

from operators import sharpe_inference
from operators.bars import Bar
from operators.decision import Decision
from operators.optimizer import (DEFAULT_CONSTRAINTS, FIXED_FIELDS, VARIANT_METRICS_COLUMNS, Choice, Constraint,
                                 Optimizer, OptimizerConfig, Param, Promotion, SearchSpace, SearchSpaceError,
                                 VariantMetrics, apply_promotion, default_space, draw_overrides)
from operators.paper import EquityPoint, Fill
from operators.records import DAY_MS as DAY
from operators.records import HOUR_MS as HOUR
from operators.records import MINUTE_MS as M
from operators.signals import Prediction, ScoredRow
from operators.strategy import StrategyEngine
from operators.strategy_config import StrategyConfig

T0 = 19_675 * DAY                    # 2023-11-14 00:00 UTC
BASE = StrategyConfig(primary_tf="5m")
DDL = Path(__file__).resolve().parents[2] / "infra" / "clickhouse" / "006_ops.sql"


# ---------------------------------------------------------------- synthetic records
def ep(vid, ts, equity, origin="experimental", symbol="A/USDT:USDT"):
    return EquityPoint(origin=origin, strategy_id="ensemble", variant_id=vid, config_hash="h", ts=ts, seq=0,
                       equity=equity, cash=equity, realised_pnl=0.0, unrealised_pnl=0.0, fees=0.0, exposure=0.0,
                       open_positions=0, peak=equity, drawdown=0.0, halted=False)


def fill(vid, ts, pnl, origin="experimental"):
    """An exit fill with the trade's net PnL (``pnl=None``: an entry fill)."""
    return Fill(origin=origin, strategy_id="ensemble", variant_id=vid, config_hash="h", ts=ts, exchange="x",
                symbol="A/USDT:USDT", side="sell", qty=1.0, price=100.0, ref_price=100.0, notional=100.0, fee=0.0,
                slippage_bps=0.0, reason="entry" if pnl is None else "take_profit", position_id=1, position_side=1,
                realised_pnl=pnl, pnl_bps=None if pnl is None else 0.0)


def decision(vid, ts, side, latency=0.0, origin="experimental", symbol="A/USDT:USDT"):
    return Decision(origin=origin, strategy_id="ensemble", variant_id=vid, config_hash="h", ts=ts, decided_at=ts,
                    exchange="x", symbol=symbol, tf="5m", bar_start=ts - 5 * M, close=100.0, action="none",
                    side=side, arm="", reason="", latency_ms=latency)


class Stream:
    """Per-strategy minute returns -> equity points each minute and an exit fill every ``every``
    minutes whose PnL is the equity change over those minutes (so trades agree with the curve)."""

    def __init__(self):
        self.s = {}

    def add(self, vid, rets, every, start=0, origin="experimental"):
        self.s[vid] = (origin, start, 10_000.0 * np.cumprod(1 + np.asarray(rets)), every)

    def feed(self, opt, m0, m1):
        out = []
        for m in range(m0, m1):
            ts = T0 + (m + 1) * M
            for vid, (origin, start, eq, every) in self.s.items():
                k = m - start
                if 0 <= k < len(eq):
                    out.append(ep(vid, ts, float(eq[k]), origin))
                    if every and k >= every and k % every == 0:
                        out.append(fill(vid, ts, float(eq[k] - eq[k - every]), origin))
        opt.observe(out)
        return T0 + m1 * M


def gates(**kw):
    base = dict(enabled=True, max_variants=8, seed=3, min_trades=30, min_runtime_ms=DAY, min_roi=0.0,
                min_win_rate=0.0, min_sharpe=1.0, psr_threshold=0.95, cool_off_ms=DAY)
    base.update(kw)
    return OptimizerConfig(**base)


# ---------------------------------------------------------------- search space validation
def errors_of(space, **kw):
    with pytest.raises(SearchSpaceError) as ei:
        space.validate(BASE, kw.get("primary_tf", "5m"), kw.get("overlay_tfs", ("15m", "1h")))
    return str(ei.value)


def not_picklable_check():
    return lambda cfg: True


def test_search_space_errors_are_clear_and_all_listed_at_once():
    msg = errors_of(SearchSpace((
        Param("s_mni", 0.05, 0.2, 0.05),                 # unknown field, with a suggestion
        Param("conf_min", 0.8, 0.6, 0.05),               # low > high
        Param("alpha_min", 0.05, 0.2, 0.0),              # step <= 0
        Param("no_trade_conf", 0.5, 1.2, 0.1),           # outside StrategyConfig's [0, 1]
        Param("fee_bps", 1.0, 5.0, 1.0),                 # fixed field
        Param("exit_on_opposite", 0, 1, 1),              # a switch: needs Choice
        Param("cooldown_bars", 0, 3, 0.5),               # integer field with a fractional step
        Choice("arms", ()),                              # no options
        Choice("arms", (("pros",),)),                    # declared twice
    )))
    assert msg.startswith("invalid optimizer search space:")
    assert "Param 's_mni': unknown field" in msg and "did you mean 's_min'" in msg
    assert "Param 'conf_min': low 0.8 > high 0.6" in msg
    assert "Param 'alpha_min': step must be > 0" in msg
    assert "Param 'no_trade_conf': value 1.1 is rejected by StrategyConfig" in msg and "[0, 1]" in msg
    assert "Param 'fee_bps': this field cannot vary: execution model" in msg
    assert "Param 'exit_on_opposite': field is a bool, not a number: use Choice" in msg
    assert "Param 'cooldown_bars': integer field: step must be whole numbers" in msg
    assert "Choice 'arms': options must be a non-empty list" in msg
    assert "Choice 'arms': declared twice" in msg
    assert len(msg.splitlines()) == 10                    # header + one line per problem


def test_search_space_rejects_timeframes_and_features_the_pipeline_does_not_compute():
    msg = errors_of(SearchSpace((Choice("primary_tf", ("5m", "15m")),)))
    assert "value '15m' is not the pipeline's primary timeframe '5m'" in msg and "needs the pipeline" in msg
    msg = errors_of(SearchSpace((Choice("consensus_tf", ("1h", "4h")),)))
    assert "value '4h' is not an overlay timeframe the pipeline computes (['15m', '1h'])" in msg
    assert "value '2h' is not a timeframe" in errors_of(SearchSpace((Choice("consensus_tf", ("2h",)),)))
    assert "not a feature the pipeline computes" in errors_of(SearchSpace((Choice("pros_feature", ("s_pro",)),)))
    assert "unknown arm" in errors_of(SearchSpace((Choice("arms", (("pros", "whales"),)),)))
    # the allowed ones pass and are normalised (lists -> tuples)
    dims = SearchSpace((Choice("primary_tf", ("", "5m")), Choice("consensus_tf", ("15m", "1h")),
                        Choice("arms", (["pros", "model_online"], ["model_onnx"])))).validate(BASE, "5m", ("15m", "1h"))
    assert dict(dims)["arms"] == (("pros", "model_online"), ("model_onnx",))


def test_constraints_are_validated_and_an_infeasible_space_fails_at_start():
    msg = errors_of(SearchSpace((Param("s_min", 0.1, 0.2, 0.05),), constraints=(
        Constraint("", DEFAULT_CONSTRAINTS[0].check), Constraint("closure", not_picklable_check()))))
    assert "needs a non-empty name" in msg and "constraint 'closure': its check cannot be pickled" in msg
    assert "search space is empty" in errors_of(SearchSpace(()))
    only_cohorts = SearchSpace((Choice("arms", (("pros",), ("pros", "amateurs"))),))
    with pytest.raises(SearchSpaceError, match=r"no variant .* satisfies the constraints .*at_least_one_model_arm"):
        Optimizer(gates(), BASE, space=only_cohorts)
    # OptimizerConfig is a pydantic dataclass: a ValidationError (a ValueError) names every bad field
    with pytest.raises(ValidationError, match=r"sampling\n  Input should be 'random' or 'grid'"):
        OptimizerConfig(sampling="sobol")
    with pytest.raises(ValidationError, match=r"max_variants\n  Input should be greater than or equal to 1") as ei:
        OptimizerConfig(max_variants=0, psr_threshold=1.5)
    assert "psr_threshold\n  Input should be less than or equal to 1" in str(ei.value)
    assert [e["loc"] for e in ei.value.errors()] == [("max_variants",), ("psr_threshold",)]


def test_fixed_fields_say_why():
    for name in ("seed", "max_drawdown", "initial_equity", "label_horizon"):
        assert name in FIXED_FIELDS and len(FIXED_FIELDS[name]) > 20


# ---------------------------------------------------------------- sampling
def overrides(opt):
    return [s.variant.overrides for s in opt.slots]


@pytest.mark.parametrize("sampling", ["random", "grid"])
def test_sampling_is_deterministic_with_the_seed_and_on_the_grid(sampling):
    a = Optimizer(gates(sampling=sampling, max_variants=16, seed=5), BASE)
    b = Optimizer(gates(sampling=sampling, max_variants=16, seed=5), BASE)
    c = Optimizer(gates(sampling=sampling, max_variants=16, seed=6), BASE)
    assert overrides(a) == overrides(b) and overrides(a) != overrides(c)
    assert a.variant_ids() == [f"v{i:04d}" for i in range(1, 17)] and a.tried == 16
    space = default_space()
    grid = dict(space.validate(BASE, "5m", ("15m", "1h")))
    hashes = set()
    for s in a.slots:
        cfg = s.variant.cfg
        assert s.variant.overrides and all(getattr(BASE, k) != v for k, v in s.variant.overrides.items())
        for k, values in grid.items():
            assert getattr(cfg, k) in values or k not in s.variant.overrides
        for p in space.params:
            if isinstance(p, Param) and p.name in s.variant.overrides:
                v = getattr(cfg, p.name)
                assert p.low - 1e-12 <= v <= p.high + 1e-12
                assert abs((v - p.low) / p.step - round((v - p.low) / p.step)) < 1e-9
        assert all(c.check(cfg) for c in space.constraints)
        assert s.engine.origin == "experimental" and s.engine.variant_id == s.variant_id
        assert s.engine.cfg == cfg and cfg.seed == BASE.seed
        hashes.add(cfg.config_hash())
    assert len(hashes) == 16 and BASE.config_hash() not in hashes


def test_grid_sampling_spreads_every_dimension():
    opt = Optimizer(gates(sampling="grid", max_variants=16), BASE)
    for name, values in opt.dims:
        seen = [getattr(s.variant.cfg, name) for s in opt.slots]
        idx = [values.index(v) for v in seen]
        assert len(set(seen)) >= min(len(values), 3), name
        if len(values) >= 4:                       # both halves of the range are visited
            assert min(idx) < len(values) / 2 <= max(idx), name


def test_refill_near_a_winner_stays_within_bounds_and_steps():
    space = default_space()
    dims = space.validate(BASE, "5m", ("15m", "1h"))
    params = {p.name: p for p in space.params if isinstance(p, Param)}
    edge = BASE.replace(s_min=0.24, conf_min=0.55, stop_loss_pct=0.03, cooldown_bars=0, pos_max=0.25)
    rng = np.random.default_rng(0)
    for _ in range(300):
        o = draw_overrides(dims, rng, near=edge, near_steps=1)
        for name, p in params.items():
            v, w = o[name], getattr(edge, name)
            assert p.low - 1e-12 <= v <= p.high + 1e-12
            values = dict(dims)[name]
            assert abs(values.index(v) - values.index(min(values, key=lambda x: abs(x - w)))) <= 1
    # production's s_min 0.12 is off the 0.03 grid: it snaps to 0.12 (on it) and moves one step at most
    o = [draw_overrides(dims, rng, near=BASE)["take_profit_pct"] for _ in range(100)]
    assert set(o) <= {0.03, 0.04, 0.05}


# ---------------------------------------------------------------- (5) metrics from the records
def test_5_metrics_match_an_independent_computation_from_fills_and_equity():
    opt = Optimizer(gates(max_variants=2), BASE)
    vid = opt.variant_ids()[0]
    marks = [(1, 10_000.0), (2, 10_050.0), (2, 10_100.0), (3, 10_050.0), (4, 10_200.0), (5, 10_150.0)]
    recs = []
    for m, e in marks:
        recs.append(ep(vid, T0 + m * M, e))
    recs += [fill(vid, T0 + M, None), fill(vid, T0 + 2 * M, 100.0), fill(vid, T0 + 3 * M, -50.0),
             fill(vid, T0 + 4 * M, 150.0)]
    sides = [1, 0, 1, -1, -1, 0, 1]
    recs += [decision(vid, T0 + (k + 1) * M, s, latency=5.0 * (k + 1)) for k, s in enumerate(sides)]
    opt.observe(recs)
    now = T0 + 10 * M
    row = next(r for r in opt.metrics(now) if r.variant_id == vid)

    equity = np.array([10_000.0, 10_100.0, 10_050.0, 10_200.0, 10_150.0])   # last mark of each minute
    r = equity[1:] / equity[:-1] - 1
    ann = math.sqrt(525_600)
    assert row.roi == pytest.approx(0.015)
    assert (row.trades, row.win_rate, row.avg_pnl, row.profit_factor) == (3, pytest.approx(2 / 3),
                                                                        pytest.approx(200 / 3), pytest.approx(5.0))
    assert row.sharpe == pytest.approx(r.mean() / r.std(ddof=1) * ann)
    assert row.sortino == pytest.approx(r.mean() / math.sqrt(np.mean(np.minimum(r, 0) ** 2)) * ann)
    assert row.max_drawdown == pytest.approx(50 / 10_100)                    # 10100 -> 10050 (all marks)
    assert row.flip_rate == pytest.approx(0.5)                               # 1 1 -1 -1 1
    lat = [5.0 * k for k in range(1, 8)]
    assert row.latency_p50_ms == pytest.approx(np.percentile(lat, 50))
    assert row.latency_p99_ms == pytest.approx(np.percentile(lat, 99))
    assert row.runtime_ms == now - (T0 + M) and row.status == "active" and row.origin == "experimental"
    assert row.config_hash == opt.slots[0].engine.config_hash
    assert msgspec.json.decode(row.config) == msgspec.json.decode(msgspec.json.encode(opt.slots[0].variant.overrides))
    # the other variant saw nothing: defined where it must be, NULL where undefined
    empty = next(r for r in opt.metrics(now) if r.variant_id != vid and r.origin == "experimental")
    assert (empty.roi, empty.trades, empty.win_rate, empty.sharpe, empty.psr, empty.max_drawdown) == \
        (0.0, 0, None, None, None, 0.0)
    # flips are per instrument: another symbol's opposite side is not a flip of this one
    opt.observe([decision(vid, T0 + 20 * M, -1, symbol="B/USDT:USDT"), decision(vid, T0 + 21 * M, 1, symbol="B/USDT:USDT")])
    assert next(r for r in opt.metrics(now) if r.variant_id == vid).flip_rate == pytest.approx(3 / 5)


def test_metrics_rows_map_one_to_one_to_the_variant_metrics_table():
    ddl = DDL.read_text()
    body = re.search(r"CREATE TABLE IF NOT EXISTS variant_metrics\s*\((.*?)\)\s*ENGINE", ddl, re.S).group(1)
    columns = [ln.strip().split()[0] for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    assert VARIANT_METRICS_COLUMNS == columns
    nullable = {c for c in columns if re.search(rf"^\s*{c}\s+Nullable", body, re.M)}
    hints = VariantMetrics.__annotations__
    assert nullable == {c for c in columns if "Optional" in str(hints[c])}
    opt = Optimizer(gates(max_variants=1), BASE)
    rows = opt.metrics(T0)
    assert [r.origin for r in rows] == ["experimental", "production"]
    assert all(len(r.row()) == len(columns) for r in rows)
    assert rows[1].variant_id == "base" and rows[1].psr is None and rows[1].config == "{}"


def test_metrics_schedule_every_n_primary_bars_and_on_every_closed_trade():
    opt = Optimizer(gates(max_variants=1, metrics_every_bars=3), BASE)
    for k in range(2):   # two primary bars, decisions of two instruments each
        opt.observe([decision("base", T0 + k * 5 * M, 0, origin="production", symbol=s) for s in ("A", "B")])
    assert not opt.metrics_due()
    opt.observe([decision("base", T0 + 10 * M, 0, origin="production")])
    assert opt.metrics_due()
    opt.metrics(T0 + 10 * M)
    assert not opt.metrics_due()
    opt.observe([fill(opt.variant_ids()[0], T0 + 11 * M, None)])              # an entry: no
    assert not opt.metrics_due()
    opt.observe([fill(opt.variant_ids()[0], T0 + 12 * M, -3.0)])              # an exit: yes
    assert opt.metrics_due()


# ---------------------------------------------------------------- realistic paired streams
BAR = 5 * M


class Market:
    """Strategies trading one market, per 5m bar (issue 12: tests on realistic return streams).

    The market's bar returns are fat-tailed and clustered: a GARCH(1, 1) with t(5) shocks (kurtosis
    ~10, |r| autocorrelated). A strategy holds -1 / 0 / +1, decided before the bar, and keeps it for
    a while (a Markov chain; positions last ~25 minutes: returns autocorrelate through them); it pays
    0.5 bp per unit of turnover, and every change of position closes a trade (an exit fill with the
    trade's PnL). Variants follow production's position for long stretches (a variant is production
    with a setting changed: ``copy`` of the time), so their returns are paired with production's.
    ``edge``: on that share of bars the strategy holds the sign of the bar's own move instead (it
    knows something: a genuinely better rule); 0 for everyone = a tape without edge."""

    def __init__(self, seed: int, bars: int):
        self.rng = np.random.default_rng(seed)
        self.bars = bars
        e = self.rng.standard_t(5, bars) / np.sqrt(5 / 3)
        h, m = np.empty(bars), np.empty(bars)
        h[0] = 1.0
        for t in range(bars):
            if t:
                h[t] = 0.05 + 0.10 * m[t - 1] ** 2 + 0.85 * h[t - 1]
            m[t] = np.sqrt(h[t]) * e[t]
        self.move = 0.002 * m
        self.prod = self._chain()
        self.s: dict = {}
        self.closed: dict = {}

    def _chain(self, stay=0.8, states=(-1.0, 0.0, 1.0)):
        pos, cur = np.empty(self.bars), float(self.rng.choice(states))
        for t in range(self.bars):
            if self.rng.random() > stay:
                cur = float(self.rng.choice(states))
            pos[t] = cur
        return pos

    def positions(self, copy=True, edge=0.0):
        """``copy``: follow production for long stretches (about 2/3 of the time) and an own chain
        in between; False: an own chain throughout; 1.0: production's positions exactly."""
        if copy == 1.0 and copy is not True:
            pos = self.prod.copy()
        elif copy:
            pos = np.where(self._chain(stay=0.97, states=(1.0, 1.0, 0.0)) > 0, self.prod, self._chain())
        else:
            pos = self._chain()
        knows = self.rng.random(self.bars) < edge
        return np.where(knows, np.sign(self.move), pos)

    def add(self, vid, pos, start=0, origin="experimental"):
        turnover = np.abs(np.diff(pos, prepend=0.0))
        r = pos * self.move - 5e-5 * turnover
        self.s[vid] = (origin, start, 10_000.0 * np.cumprod(1 + r[start:]), pos[start:])

    def feed(self, opt, b0, b1):
        """Equity marks at every bar's end, an exit fill at every change of position (its PnL: the
        equity change since the previous one), production's decision at the last bar's end."""
        out = []
        for b in range(b0, b1):
            ts = T0 + (b + 1) * BAR
            for vid, (origin, start, eq, pos) in self.s.items():
                k = b - start
                if 0 <= k < len(eq):
                    out.append(ep(vid, ts, float(eq[k]), origin))
                    if k and pos[k] != pos[k - 1]:
                        closed = self.closed.get(vid, 0)
                        out.append(fill(vid, ts, float(eq[k] - eq[closed]), origin))
                        self.closed[vid] = k
        out.append(decision("base", T0 + b1 * BAR, 1, origin="production"))
        opt.observe(out)
        return T0 + b1 * BAR


# ---------------------------------------------------------------- (2) the planted variant
def test_2_planted_variant_is_promoted_at_the_end_of_its_trial_but_not_a_few_trade_one_or_noise():
    """At default gates (24 h trial, 30 trades, alpha 5% spent over the search): the variant with a
    genuinely better rule (production's positions, but on 15% of the bars it holds the sign of the
    coming move) is promoted at its one test, the first evaluation after its 24 h trial, i.e. within
    300 bars (288 + the hourly schedule): in 19 of 20 seeds measured. A variant that trades 8 times
    a day (too little evidence), and variants without edge, retire."""
    mk = Market(seed=4, bars=2 * 288)
    opt = Optimizer(gates(max_variants=8), BASE)
    planted, few, *noise = opt.variant_ids()
    mk.add("base", mk.prod, origin="production")
    mk.add(planted, mk.positions(copy=1.0, edge=0.15))
    mk.add(few, np.repeat(np.sign(mk.move[::36]), 36)[: mk.bars])  # 3-hour holds: 8 trades a day
    for vid in noise:
        mk.add(vid, mk.positions())
    seen = {}
    for b in range(0, 300, 12):
        now = mk.feed(opt, b, b + 12)
        for v in opt.evaluate(now):
            seen[v.variant_id] = v
        p = opt.maybe_promote(now)
        if p is not None:
            break
    assert p is not None and p.variant_id == planted and (b + 12) <= 300
    assert T0 + 24 * HOUR <= p.ts and p.metrics.trades >= 30 and p.metrics.dsr >= 0.95
    assert "Ledoit-Wolf" in p.reason and "weight 0.0625" in p.reason  # 1/(2 x 8) of alpha
    final = seen[few]
    assert final.failed[0].startswith("trades ") and final.metrics.trades < 30
    statuses = {s.variant_id: s.status for s in opt.slots}
    assert statuses[planted] == "promoted" and statuses[few] == "retired"
    assert all(statuses[v] == "retired" for v in noise)  # one test each, spent
    assert opt.tested == 8


def test_2b_the_planted_rule_is_found_at_its_first_test_in_most_seeds():
    promoted = 0
    for seed in range(20):
        mk = Market(seed=seed, bars=290)
        opt = Optimizer(gates(max_variants=8), BASE)
        mk.add("base", mk.prod, origin="production")
        mk.add(opt.variant_ids()[0], mk.positions(copy=1.0, edge=0.15))
        p = opt.maybe_promote(mk.feed(opt, 0, 290))
        promoted += p is not None and p.variant_id == "v0001"
    assert promoted >= 17


# ---------------------------------------------------------------- (3) no edge: nobody, over seeds
def test_3_on_a_tape_without_edge_16_variants_over_4_days_promote_nothing_over_20_seeds():
    """16 variants at a time, refilled as they retire, 4 days of bars, 20 seeds: every strategy is
    equally without edge, so a promotion is a false one. The family-wise budget is 5%: at most one
    seed of twenty may promote. The rules this replaces would promote in most: the best variant by
    Sharpe beats production's estimated Sharpe with a convincing PSR almost every time."""
    false_promotions, naive = 0, 0
    for seed in range(20):
        mk = Market(seed=100 + seed, bars=4 * 288)
        opt = Optimizer(gates(max_variants=16, seed=seed), BASE)
        mk.add("base", mk.prod, origin="production")
        for vid in opt.variant_ids():
            mk.add(vid, mk.positions())
        drawn = set(opt.variant_ids())
        promotions, fooled = [], False
        for b in range(0, mk.bars, 12):
            now = mk.feed(opt, b, b + 12)
            if (b + 12) % 288 == 0:  # a day of trials ends: what the old rule would have done
                rows = [v.metrics for v in opt.evaluate(now) if v.metrics.trades >= 30 and v.metrics.sharpe]
                prod = opt._prod.curve.returns().sharpe()
                best = max(rows, key=lambda r: r.sharpe)
                r = opt._by_id[best.variant_id].track.curve.returns()
                # PSR vs production's estimate
                fooled |= sharpe_inference.psr(r.sharpe(), prod, r.n, *r.moments()) > 0.95
            p = opt.maybe_promote(now)
            if p is not None:
                promotions.append(p)
                opt.refill(now)
            for vid in set(opt.variant_ids()) - drawn:  # refills trade too, without edge
                mk.add(vid, mk.positions(), start=b + 12)
                drawn.add(vid)
        assert opt.tested >= 3 * 16  # 16 tested per day of trials
        false_promotions += bool(promotions)
        naive += fooled
    print(f"false promotions in {false_promotions} of 20 seeds; the PSR-vs-production rule: {naive}")
    assert false_promotions <= 1
    assert naive >= 8


# ---------------------------------------------------------------- (4) cool-off, audit, refill
def test_4_promotion_is_audited_other_tested_variants_retire_and_the_cool_off_defers_tests():
    mk = Market(seed=7, bars=3 * 288)
    opt = Optimizer(gates(cool_off_ms=30 * HOUR, refill_near_winner=True), BASE)
    a, b, *noise = opt.variant_ids()
    mk.add("base", mk.prod, origin="production")
    mk.add(a, mk.positions(copy=1.0, edge=0.3))
    mk.add(b, mk.positions(copy=1.0, edge=0.2))
    for vid in noise:
        mk.add(vid, mk.positions())
    for bar in range(0, 300, 12):
        now = mk.feed(opt, bar, bar + 12)
        due = [v for v in opt.evaluate(now) if v.metrics.runtime_ms >= DAY]
        p = opt.maybe_promote(now)
        if p is not None:
            break
    assert isinstance(p, Promotion) and p.variant_id == a and p.ts == now
    assert {v.variant_id for v in due if v.qualifies} == {a, b}  # both passed; the better one won
    old_cfg, new_cfg = BASE, opt.variant(a).cfg
    assert p.old_config == old_cfg.to_dict() and p.new_config == new_cfg.to_dict()
    assert (p.old_hash, p.new_hash) == (old_cfg.config_hash(), new_cfg.config_hash())
    assert p.changes == {k: [getattr(old_cfg, k), v] for k, v in opt.variant(a).overrides.items()}
    assert p.metrics.status == "promoted" and p.n_trials == 8 and p.reason.startswith("dsr ")
    ev = p.as_event()
    detail = msgspec.json.decode(ev.detail)
    assert ev.kind == "promotion" and ev.ts == now and detail["old_hash"] == p.old_hash
    assert detail["new_config"] == msgspec.json.decode(msgspec.json.encode(new_cfg.to_dict()))
    assert opt.base == new_cfg                                   # new variants derive from the winner
    statuses = {s.variant_id: s.status for s in opt.slots}
    assert statuses[a] == "promoted" and statuses[b] == "retired"  # b had its one test
    assert all(e.variant_id not in (a, b) for e in opt.engines())
    # refill: the tested slots leave, new variants near the winner start
    new_ids = opt.refill(now)
    assert len(new_ids) == 8 and opt.tried == 16 and len(opt.engines()) == 8
    steps = {q.name: q.step for q in opt.space.params if isinstance(q, Param)}
    for vid in new_ids:
        slot = opt._by_id[vid]
        assert slot.track.started_ms == now and slot.variant.cfg != opt.base
        for k, v in slot.variant.overrides.items():          # near the winner: one step at most
            if k in steps:
                assert abs(v - getattr(opt.base, k)) <= steps[k] + 1e-9
        mk.add(vid, mk.positions(), start=bar + 12)
    # their trials end 24 h later, inside the 30 h cool-off: not tested until it is over
    tested, promoted_at = opt.tested, now
    for bar in range(bar + 12, 3 * 288, 12):
        now = mk.feed(opt, bar, bar + 12)
        assert opt.maybe_promote(now) is None
        if opt.in_cool_off(now):
            assert opt.tested == tested
    assert now - promoted_at > 30 * HOUR and opt.tested == tested + 8


# ---------------------------------------------------------------- off means off
class Exploding:
    def __iter__(self):
        raise AssertionError("the optimizer looked at records while off")


def test_off_means_off():
    bad_space = SearchSpace((Param("nope", 1, 0, -1),))          # not even validated when off
    opt = Optimizer(OptimizerConfig(), BASE, space=bad_space)
    assert not opt.enabled and opt.engines() == [] and opt.slots == [] and opt.tried == 0
    opt.observe(Exploding())
    assert opt.metrics(T0) == [] and opt.evaluate(T0) == [] and opt.maybe_promote(T0) is None
    assert opt.refill(T0) == [] and opt.next_variant() is None and not opt.metrics_due()
    assert opt.production_metrics(T0) is None and opt.now_ms is None
    assert b"StrategyEngine" not in pickle.dumps(opt)


# ---------------------------------------------------------------- snapshots
def test_pickle_and_deepcopy_round_trip_mid_stream():
    rng = np.random.default_rng(2)
    opt = Optimizer(gates(max_variants=4, min_runtime_ms=HOUR), BASE)
    st = Stream()
    st.add("base", rng.normal(0, 1e-3, 300), 20, origin="production")
    for vid in opt.variant_ids():
        st.add(vid, rng.normal(1e-4, 1e-3, 300), 20)
    st.feed(opt, 0, 150)
    opt.observe([decision(opt.variant_ids()[0], T0 + 150 * M, 1, latency=3.0)])
    clones = [pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)]
    for o in [opt] + clones:
        now = st.feed(o, 150, 300)
    want = [msgspec.to_builtins(r) for r in opt.metrics(now)]
    for c in clones:
        assert [msgspec.to_builtins(r) for r in c.metrics(now)] == want
        assert c.retire(c.variant_ids()[1]) and c.refill(now) == ["v0005"]
    assert opt.retire(opt.variant_ids()[1]) and opt.refill(now) == ["v0005"]
    assert clones[0].slots[-1].variant == clones[1].slots[-1].variant == opt.slots[-1].variant   # same rng state


# ---------------------------------------------------------------- real engines
EX, SYM = "binanceusdm", "BTC/USDT:USDT"


def pred(p_up, p_down):
    return Prediction(model="river_lr", version="t", p_down=p_down, p_flat=1.0 - p_up - p_down, p_up=p_up)


def scored(end, close, up):
    p = pred(0.8, 0.1) if up else pred(0.1, 0.8)
    return ScoredRow(exchange=EX, symbol=SYM, tf="5m", start=end - 5 * M, end=end, close=close, warm=True,
                     regime="RANGING", features={"s_top_ema": 0.3 if up else -0.3, "s_bot_ema": None, "rv": 0.5,
                                                 "atr": 0.5, "1h_ret_12": 0.0},
                     overlay_ok={"1h": True}, predictions={"river_lr": p})


def bar(start, o, c):
    h, lo = max(o, c) * 1.0005, min(o, c) * 0.9995
    return Bar(exchange=EX, symbol=SYM, tf="1m", start=start, end=start + M, open=o, high=h, low=lo, close=c,
               volume=1.0, notional=o, vwap=o, trades=1, buy_volume=0.5, sell_volume=0.5, delta=0.0, min_delta=0.0,
               max_delta=0.0, largest_trade=1.0, largest_notional=o, parent_orders=1, pro_orders=0,
               amateur_orders=0, pros_gross=0.0, pros_net=0.0, amateurs_gross=0.0, amateurs_net=0.0, s_top=0.0,
               s_bot=0.0, s_mood=0.0, pro_threshold=0.0, amateur_threshold=0.0, poc=o, vah=o, val=o,
               profile_bin=1.0)


def market(hours, seed=0):
    """A random walk: 1m bars, and a scored 5m row at each 5m close with a noisy model."""
    rng = np.random.default_rng(seed)
    price, items = 100.0, []
    for k in range(hours * 60):
        start = T0 + k * M
        close = price * (1 + rng.normal(0, 0.002))
        items.append(bar(start, price, close))
        if (k + 1) % 5 == 0:
            items.append(scored(start + M, close, rng.random() < 0.5))
        price = close
    return items


def run(engines, items, opt=None):
    """The portfolio loop in miniature: every engine gets every item; the optimizer sees it all."""
    per_engine = {id(e): [] for e in engines}
    for it in items:
        for e in engines:
            out = e.on_bar(it) if isinstance(it, Bar) else e.on_scored(it, None, it.end + 5)
            per_engine[id(e)] += out
            if opt is not None:
                opt.observe(out)
    return per_engine


BASE_E = StrategyConfig(primary_tf="5m", consensus_enabled=False, cooldown_bars=0, max_drawdown=0.0,
                        daily_loss_limit=0.0, max_consecutive_losses=0, time_stop_bars=3)
SMALL = SearchSpace((Param("stop_loss_pct", 0.002, 0.01, 0.002), Param("take_profit_pct", 0.004, 0.02, 0.004),
                     Choice("exit_on_opposite", (True, False))))


def test_metrics_on_real_engines_match_their_own_summaries_and_production_is_untouched():
    items = market(8)
    alone = StrategyEngine(BASE_E)
    solo = run([alone], items)[id(alone)]
    prod = StrategyEngine(BASE_E)
    opt = Optimizer(gates(max_variants=4), BASE_E, space=SMALL)
    recs = run([prod] + opt.engines(), items, opt)
    # isolation: production's records are identical with the optimizer on
    assert [msgspec.to_builtins(r) for r in recs[id(prod)]] == [msgspec.to_builtins(r) for r in solo]
    now = items[-1].end
    rows = {r.variant_id: r for r in opt.metrics(now)}
    for e in [prod] + opt.engines():
        s, r = e.summary(), rows[e.variant_id]
        assert s["trades"] >= 5, e.variant_id
        assert r.trades == s["trades"] and r.roi == pytest.approx(s["roi"], abs=1e-12)
        assert r.win_rate == pytest.approx(s["win_rate"]) and r.avg_pnl == pytest.approx(s["avg_pnl"])
        assert r.sharpe == pytest.approx(s["sharpe"], rel=1e-9)
        assert r.max_drawdown == pytest.approx(s["max_drawdown"], abs=1e-12)
        assert r.profit_factor == (pytest.approx(s["profit_factor"]) if math.isfinite(s["profit_factor"]) else None)
        assert r.config_hash == e.config_hash
    assert rows["base"].origin == "production" and len(rows) == 5


# ---------------------------------------------------------------- applying a promotion
def test_apply_promotion_keeps_the_book_and_lets_the_new_exits_manage_open_positions():
    old_cfg = StrategyConfig(primary_tf="5m", consensus_enabled=False, stop_loss_pct=0.02, take_profit_pct=0.0,
                             trailing_distance_pct=0.0, atr_sl_mult=0.0, atr_tp_mult=0.0, time_stop_bars=0)
    new_cfg = old_cfg.replace(stop_loss_pct=0.005, model_optimism=0.3, arms=("pros", "model_online"))
    eng = StrategyEngine(old_cfg)
    eng.on_scored(scored(T0, 100.0, True), None, T0)
    fills = [r for r in eng.on_bar(bar(T0, 100.0, 100.0)) if isinstance(r, Fill)]
    assert len(fills) == 1 and fills[0].reason == "entry" and fills[0].position_side == 1
    eng.bandit.update("model_online", 0.4)
    promo = Promotion(ts=T0 + M, strategy_id="ensemble", variant_id="v0001", old_config=old_cfg.to_dict(),
                      new_config=msgspec.json.decode(msgspec.json.encode(new_cfg.to_dict())),   # lists after JSON
                      old_hash=old_cfg.config_hash(), new_hash=new_cfg.config_hash(), changes={},
                      metrics=VariantMetrics(ts=0, origin="experimental", strategy_id="ensemble", variant_id="v0001",
                                             config_hash="", config="{}", status="promoted", runtime_ms=0, roi=0.0,
                                             trades=0, win_rate=None, avg_pnl=None, sharpe=None, sortino=None,
                                             profit_factor=None, max_drawdown=0.0, flip_rate=None,
                                             latency_p50_ms=None, latency_p99_ms=None, psr=None, dsr=None),
                      reason="test", n_trials=1)
    before = pickle.dumps(eng)
    new = apply_promotion(eng, promo)
    assert pickle.dumps(eng) == before                                  # the old engine is untouched
    assert new.cfg == new_cfg and new.config_hash == new_cfg.config_hash() == new.tags["config_hash"]
    assert new.book.tags["config_hash"] == new.config_hash and new.origin == "production"
    inst = f"{EX}:{SYM}"
    assert new.book.positions[inst].entry_price == eng.book.positions[inst].entry_price
    assert new.book.cash == eng.book.cash and new.risk.peak == eng.risk.peak
    assert new.bandit.arms == ("pros", "model_online") and new.bandit.n["model_online"] == 1
    assert new.bandit.model_optimism == 0.3 and new.bandit.posterior("model_online")[0] != \
        eng.bandit.posterior("model_online")[0]
    # a 1% dip: the new 0.5% stop (from the ENTRY price) closes, the old 2% stop holds
    dip = bar(T0 + M, 100.0, 99.0)                                      # low 98.95
    new_exit = [r for r in new.on_bar(dip) if isinstance(r, Fill)]
    old_exit = [r for r in eng.on_bar(copy.deepcopy(dip)) if isinstance(r, Fill)]
    assert old_exit == [] and len(new_exit) == 1 and new_exit[0].reason == "stop_loss"
    assert new_exit[0].config_hash == new_cfg.config_hash()
    assert new_exit[0].ref_price == pytest.approx(fills[0].price * 0.995)   # the level, from the entry
    # a stale promotion (production moved on) is refused
    assert apply_promotion(new, promo) is None
