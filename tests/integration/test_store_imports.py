"""Writing to the store does not import pandas (~60 MB and ~0.4 s per writing process): our rows
are lists, our reads tuples; clickhouse-connect would import it at the first insert."""

import subprocess
import sys

SCRIPT = """
import sys
from datetime import datetime, timezone
from sinks.rows import Rows
from sinks.store import Store
st = Store("chdb://" + sys.argv[1], "tapeflow")
at = datetime(2024, 1, 1, 0, 1, tzinfo=timezone.utc)
st.insert("events", Rows(["kind", "ts", "exchange", "symbol", "reason", "source"],
                         [["data_gap", at, "x", "A/B", "probe", "test"]]))
_, rows = st.query("SELECT kind, ts, reason FROM events FINAL")
print(rows[0][0], rows[0][1].isoformat(), rows[0][2], "pandas" in sys.modules)
"""


def test_opening_inserting_and_reading_leave_pandas_unimported(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ch")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    kind, ts, reason, pandas = res.stdout.split()
    assert (kind, reason) == ("data_gap", "probe")
    assert ts.startswith("2024-01-01T00:01:00")  # the datetime went in and came back without pandas
    assert pandas == "False"
