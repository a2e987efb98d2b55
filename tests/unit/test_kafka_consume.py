"""How the Kafka source takes what librdkafka's ``consume`` returns (dataflows/kafka_source.py): the
end of a partition comes as an event among the messages, and messages produced meanwhile can follow
it in the same call (seen on tansu: ``[end at 100, 100, 101, ... 109]``). librdkafka's timing decides
when that happens, so the calls are scripted here: a consumer that returns what the test says (the
partition's own consumer is created against an address nothing listens on and never used)."""

from confluent_kafka import KafkaError

from dataflows.kafka_source import KafkaBatchSource

TS = 1_704_067_200_000


class _Err:
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def str(self):
        return "scripted"


class _Msg:
    def __init__(self, offset, eof=False):
        self._offset, self._eof = offset, eof

    def error(self):
        return _Err(KafkaError._PARTITION_EOF) if self._eof else None

    def offset(self):
        return self._offset

    def value(self):
        return b'{"ts": %d}' % (TS + self._offset * 60_000)

    def key(self):
        return None


class _Scripted:
    def __init__(self, calls):
        self.calls = list(calls)

    def consume(self, n, timeout):
        return self.calls.pop(0) if self.calls else []

    def get_watermark_offsets(self, tp, cached=True):
        return (-1, -1)

    def close(self):
        pass


def _part(tail, calls):
    part = KafkaBatchSource("127.0.0.1:9", "t", tail=tail, start="earliest").build_part("in", "0-t", None)
    part.consumer.close()
    part.consumer = _Scripted(calls)  # test seam: librdkafka's answers, scripted
    return part


def _drain(part, polls=6):
    out = []
    for _ in range(polls):
        try:
            for b in part.next_batch():
                out += b.offsets
        except StopIteration:
            out.append("stop")
            break
    return out


def test_a_tail_keeps_the_messages_after_an_end_of_partition_event():
    part = _part(True, [[_Msg(0), _Msg(1)], [_Msg(2, eof=True), _Msg(2), _Msg(3)], [_Msg(4), _Msg(5, eof=True)]])
    assert _drain(part, 2) == [0, 1, 2, 3]
    assert not part.caught_up  # messages came after the event: not at the end
    assert _drain(part, 1) == [4] and part.caught_up and not part.eof
    assert part.snapshot() == 5


def test_a_partition_that_ends_stops_at_the_event_and_resumes_from_there():
    part = _part(False, [[_Msg(0), _Msg(1), _Msg(2, eof=True), _Msg(2)]])
    assert _drain(part) == [0, 1, "stop"]
    assert part.snapshot() == 2  # message 2 came after the end: the next run reads it
