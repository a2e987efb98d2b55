"""operators/venue_gaps.py: sequential-id venues, id spans, id-gap tracking, recent ids and backfill merging."""

from __future__ import annotations

import pickle

from operators.records import Trade
from operators.venue_gaps import SEQUENTIAL_IDS, Gap, IdGapTracker, RecentIds, id_span, merge_backfill
from tests.unit.test_venue_trades import FIXTURES


# -- sequential ids ------------------------------------------------------------------------------

def test_sequential_id_venues_are_decided_for_all_five():
    assert set(SEQUENTIAL_IDS) == {"kucoinfutures", "binanceusdm", "bybit", "okx", "hyperliquid"}
    assert SEQUENTIAL_IDS["binanceusdm"] and SEQUENTIAL_IDS["okx"]
    assert not SEQUENTIAL_IDS["bybit"] and not SEQUENTIAL_IDS["hyperliquid"]


def test_id_span():
    assert id_span("binanceusdm", FIXTURES["binanceusdm"]) == (2270914331, 2270914331)
    # okx: one message aggregates `count` fills ending at tradeId
    assert id_span("okx", FIXTURES["okx"]) == (1394851205, 1394851207)
    assert id_span("okx", dict(FIXTURES["okx"], info={})) == (1394851207, 1394851207)
    assert id_span("bybit", FIXTURES["bybit"]) is None  # UUIDs
    assert id_span("hyperliquid", FIXTURES["hyperliquid"]) is None
    assert id_span("binanceusdm", dict(FIXTURES["binanceusdm"], id="abc")) is None


def test_gap_tracker_detects_missing_ranges_per_instrument():
    g = IdGapTracker()
    assert g.observe("b:X", 100, 1_000) is None  # first trade: nothing to compare with
    assert g.observe("b:X", 101, 1_001) is None
    assert g.observe("b:Y", 7, 1_001) is None  # instruments are independent
    gap = g.observe("b:X", 105, 1_009)
    assert gap == Gap("b:X", 102, 104, 1_001, 1_009) and gap.missing == 3
    assert g.observe("b:X", 106, 1_010) is None
    assert g.gaps("b:X") == 1 and g.gaps("b:Y") == 0
    # old or repeated ids change nothing
    assert g.observe("b:X", 103, 1_005) is None and g.is_behind("b:X", 103)
    assert g.observe("b:X", 107, 1_011) is None
    assert not g.is_behind("b:X", 108)


def test_gap_tracker_with_aggregated_spans():
    g = IdGapTracker()
    assert g.observe("okx:X", 10, 1, 10) is None
    assert g.observe("okx:X", 11, 2, 13) is None  # 3 fills aggregated: no gap
    assert g.observe("okx:X", 14, 3, 14) is None
    assert g.observe("okx:X", 18, 4, 20) == Gap("okx:X", 15, 17, 3, 4)


def test_gap_tracker_pickles():
    g = IdGapTracker()
    g.observe("b:X", 1, 10)
    g.observe("b:X", 5, 20)
    h = pickle.loads(pickle.dumps(g))
    assert h == g
    assert h.observe("b:X", 7, 30) == Gap("b:X", 6, 6, 20, 30)


# -- backfill merge ------------------------------------------------------------------------------

def _t(i, ts):
    return Trade(exchange="x", symbol="A/B:B", id=str(i), ts=ts, price=1.0, amount=1.0, side="buy")


def test_merge_backfill_drops_seen_and_repeats_and_orders_by_ts_then_id():
    fetched = [_t(12, 1_005), _t(10, 1_000), _t(9, 1_000), _t(11, 1_005), _t(10, 1_000), _t(8, 999)]
    out = merge_backfill({"8"}, fetched)
    assert [t.id for t in out] == ["9", "10", "11", "12"]  # 9 before 10: numeric, not text order
    assert merge_backfill(set(), []) == []
    uuids = [_t("b-uuid", 5), _t("a-uuid", 5), _t("c-uuid", 4)]
    assert [t.id for t in merge_backfill(RecentIds(), uuids)] == ["c-uuid", "a-uuid", "b-uuid"]


def test_recent_ids_is_bounded_and_pickles():
    r = RecentIds(maxlen=3)
    for i in "abcd":
        r.add(i)
    r.add("d")
    assert len(r) == 3 and "a" not in r and all(i in r for i in "bcd")
    s = pickle.loads(pickle.dumps(r))
    s.add("e")
    assert "b" not in s and "e" in s and len(s) == 3
    assert merge_backfill(s, [_t("c", 1), _t("z", 2)])[0].id == "z"
