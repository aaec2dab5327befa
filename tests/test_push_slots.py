"""Decode's push pre-allocations (``services.decode.push.PushedRequests``): pure state, a hand-moved clock.

The rule under test: decode never lets its blocks go while a confirmed write may still land in them.
"""

import pytest

from common.errors import PeerError
from common.kv_transfer.leases import LeaseTable
from common.messages import PushDone
from services.decode.push import ABORTED, EXPIRED, PushedRequests
from tests.procs import Clock

WRITER = b"prefill"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pushed(clock: Clock) -> PushedRequests:
    return PushedRequests(LeaseTable(3.0, clock=clock, max_seconds=30.0))


async def test_confirmation_answers_the_held_blocks_and_push_done_settles(pushed: PushedRequests):
    tid, _, slot = pushed.open("r1", [4, 5, 6])
    assert set(pushed.renew([tid, "unknown"], WRITER)) == {tid} and pushed.block_ids(tid) == [4, 5, 6]
    pushed.done(PushDone(tid, 17))
    assert slot.settled.result().first_token_id == 17 and len(pushed) == 0
    assert pushed.renew([tid], WRITER) == {}  # settled: a later writer finds nothing


async def test_an_abort_between_writes_settles_at_once(pushed: PushedRequests):
    tid, _, slot = pushed.open("r1", [1])
    pushed.renew([tid], WRITER)
    pushed.release(tid, WRITER)  # the writer stopped: no write in flight
    pushed.abort("r1")
    assert slot.settled.result() == ABORTED and pushed.renew([tid], WRITER) == {}


async def test_an_abort_during_a_write_waits_for_the_writers_next_message(pushed: PushedRequests):
    for next_message in ("renew", "release", "done"):
        tid, _, slot = pushed.open("r1", [1, 2])
        pushed.renew([tid], WRITER)  # a write may now be in flight
        pushed.abort("r1")
        assert not slot.settled.done()  # the blocks stay allocated under that write
        if next_message == "renew":
            assert pushed.renew([tid], WRITER) == {}  # refused: nothing more is written
        elif next_message == "release":
            pushed.release(tid, WRITER)
        else:
            with pytest.raises(PeerError, match="not held"):
                pushed.done(PushDone(tid, 3))
        assert slot.settled.result() == ABORTED and not pushed.holds("r1")


async def test_a_push_nobody_confirms_expires_and_confirmations_renew(pushed: PushedRequests, clock: Clock):
    tid, expiry, slot = pushed.open("r1", [1])
    clock.now += 2.0
    assert pushed.renew([tid], WRITER)[tid] > expiry
    clock.now += 2.0
    pushed.expire()
    assert not slot.settled.done()  # renewed 2 s ago: 1 s left
    clock.now += 1.5
    pushed.expire()
    assert slot.settled.result() == EXPIRED and len(pushed) == 0


async def test_an_aborted_writer_that_never_speaks_again_is_settled_by_expiry(pushed: PushedRequests, clock: Clock):
    tid, _, slot = pushed.open("r1", [1])
    pushed.renew([tid], WRITER)
    pushed.abort("r1")
    clock.now += 3.5
    pushed.expire()
    assert slot.settled.result() == EXPIRED
