"""While a flow runs, what existed before it (modules, models, configs) is frozen out of the
garbage collector's full collections (a ~65 ms pause of a decision otherwise); after it, not."""

import gc

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource

from dataflows.runner import execute


def test_the_collector_skips_what_existed_before_the_run_and_only_during_it():
    seen = []
    flow = Dataflow("gc_probe")
    items = op.input("in", flow, TestingSource([1, 2]))
    op.inspect("freeze", items, lambda _step, _x: seen.append(gc.get_freeze_count()))
    assert gc.get_freeze_count() == 0
    execute(flow, epoch_interval_s=1.0, recovery=None)
    assert len(seen) == 2 and min(seen) > 1000  # the interpreter's objects, at least
    assert gc.get_freeze_count() == 0  # a later phase (or a test) is collected as usual
