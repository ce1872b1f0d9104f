"""Lease timing, expiry detection and the lease keeper, without NATS."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from live_transcription.clock import ManualClock
from live_transcription.cluster.codec import LeaseValue, RoomRecord
from live_transcription.cluster.keeper import LeaseKeeper
from live_transcription.cluster.leases import RELEASED, ExpiryTracker, LeaseClock
from live_transcription.cluster.options import ClusterOptions
from live_transcription.cluster.store import Lease, LeaseLost

TTL = 15.0


def lease_value(owner: str, room: str = "room", targets: frozenset[str] = frozenset({"s1"})) -> LeaseValue:
    return LeaseValue(owner, RoomRecord(room, "de", targets))


# --- LeaseClock -------------------------------------------------------------------------------------------


def test_renewal_comes_a_period_after_the_last_confirmed_write() -> None:
    clock = LeaseClock(ttl=TTL, renew_every=5, retry_every=1, margin=2, confirmed_at=100)
    assert clock.next_renewal(100, failed=False) == 5
    assert clock.next_renewal(103, failed=False) == 2
    clock.confirmed(105)
    assert clock.next_renewal(105, failed=False) == 5


def test_failed_writes_retry_and_never_wait_past_the_expiry() -> None:
    clock = LeaseClock(ttl=TTL, renew_every=5, retry_every=1, margin=2, confirmed_at=100)
    assert clock.next_renewal(105, failed=True) == 1
    assert clock.next_renewal(112.5, failed=True) == pytest.approx(0.5)  # expiry point 113
    assert not clock.expired(112.9)
    assert clock.expired(113)


def test_a_late_confirmation_does_not_move_time_back() -> None:
    clock = LeaseClock(ttl=TTL, renew_every=5, retry_every=1, margin=2, confirmed_at=100)
    clock.confirmed(90)
    assert not clock.expired(112)


def test_renew_period_must_fit_in_the_ttl() -> None:
    with pytest.raises(ValueError, match="renew_every"):
        LeaseClock(ttl=TTL, renew_every=13, retry_every=1, margin=2, confirmed_at=0)


# --- ExpiryTracker ----------------------------------------------------------------------------------------


def tracker() -> ExpiryTracker:
    return ExpiryTracker(ttl=TTL, takeover_grace=6, forget_after=60)


def test_a_lease_that_vanishes_is_an_orphan_with_its_last_record() -> None:
    t = tracker()
    assert t.observe({"room": lease_value("a")}, now=0) == []
    newer = lease_value("a", targets=frozenset({"s1", "s2"}))
    assert t.observe({"room": newer}, now=3) == []
    (orphan,) = t.observe({}, now=6)
    assert orphan.record == newer.record
    assert orphan.previous_owner == "a"
    assert t.orphan("room") == orphan
    assert t.expired_seen == 1


def test_a_released_lease_is_not_an_orphan() -> None:
    t = tracker()
    t.observe({"room": lease_value("a")}, now=0)
    assert t.observe({"room": RELEASED}, now=3) == []
    assert t.observe({}, now=20) == []  # the delete marker expired too


def test_a_vanished_lease_after_a_long_gap_is_not_trusted() -> None:
    t = tracker()
    t.observe({"room": lease_value("a")}, now=0)
    assert t.observe({}, now=TTL) == []  # released and its marker gone, or expired: unknown
    assert t.uncertain == 1


def test_an_orphan_leaves_when_leased_again_or_forgotten() -> None:
    t = tracker()
    t.observe({"room": lease_value("a"), "other": lease_value("a", "other")}, now=0)
    assert {o.room for o in t.observe({}, now=3)} == {"room", "other"}
    assert {o.room for o in t.observe({"room": lease_value("b")}, now=6)} == {"other"}
    assert t.orphan("room") is None
    assert [o.room for o in t.observe({"room": lease_value("b")}, now=64)] == []
    assert t.forgotten == 1


def test_overdue_after_the_grace() -> None:
    t = tracker()
    t.observe({"room": lease_value("a")}, now=0)
    (orphan,) = t.observe({}, now=3)
    assert not t.overdue(orphan, now=8)
    assert t.overdue(orphan, now=9)


# --- LeaseKeeper ------------------------------------------------------------------------------------------


class FakeStore:
    """A lease store whose answers the test scripts."""

    ttl = TTL

    def __init__(self) -> None:
        self.writes: list[LeaseValue] = []
        self.released: list[Lease] = []
        self.fail_with: BaseException | None = None
        self.wrote = asyncio.Event()

    async def renew(self, lease: Lease, value: LeaseValue | None = None) -> Lease:
        self.wrote.set()
        if self.fail_with is not None:
            raise self.fail_with
        value = value or lease.value
        self.writes.append(value)
        return Lease(lease.room, lease.revision + 1, value)

    async def release(self, lease: Lease) -> bool:
        self.released.append(lease)
        return True


class Owner:
    def __init__(self) -> None:
        self.lost: list[tuple[str, str]] = []

    def __call__(self, room: str, reason: str) -> None:
        self.lost.append((room, reason))


def make_keeper(store: FakeStore, clock: ManualClock, owner: Owner) -> LeaseKeeper:
    return LeaseKeeper(
        store,  # type: ignore[arg-type]
        Lease("room", 1, lease_value("me")),
        renew_every=5,
        retry_every=1,
        margin=2,
        clock=clock,
        on_lost=owner,
        confirmed_at=clock.now(),
    )


async def test_keeper_renews_writes_records_and_releases_the_last_revision() -> None:
    store, clock, owner = FakeStore(), ManualClock(), Owner()
    keeper = make_keeper(store, clock, owner)
    async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
        tasks.create_task(keeper.run())
        await clock.wait_for_sleepers()
        await clock.advance(5)
        await clock.wait_for_sleepers()
        assert len(store.writes) == 1
        changed = RoomRecord("room", "fr", frozenset({"s1", "s9"}))
        keeper.update_record(changed)
        while len(store.writes) < 2:  # written at once, not at the next period
            store.wrote.clear()
            await store.wrote.wait()
        assert store.writes[-1].record == changed
        keeper.stop()
        await keeper.done.wait()
    assert owner.lost == []
    assert [lease.revision for lease in store.released] == [3]
    assert store.released[0].value.record == changed
    assert keeper.released


async def test_keeper_tells_the_owner_when_another_replica_took_the_lease() -> None:
    store, clock, owner = FakeStore(), ManualClock(), Owner()
    store.fail_with = LeaseLost("taken")
    keeper = make_keeper(store, clock, owner)
    async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
        tasks.create_task(keeper.run())
        await clock.wait_for_sleepers()
        await clock.advance(5)
        await keeper.done.wait()
    assert owner.lost == [("room", "taken")]
    assert store.released == []  # not ours to release


async def test_keeper_gives_the_room_up_when_renewals_fail_until_the_lease_may_expire() -> None:
    store, clock, owner = FakeStore(), ManualClock(), Owner()
    store.fail_with = nats.errors.ConnectionClosedError()
    keeper = make_keeper(store, clock, owner)
    async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
        tasks.create_task(keeper.run())
        for _ in range(20):  # bounded: 5 s period, then 1 s retries up to ttl - margin = 13 s
            if keeper.done.is_set():
                break
            await clock.wait_for_sleepers()
            await clock.advance(1)
        await keeper.done.wait()
    assert len(owner.lost) == 1
    assert "expired" in owner.lost[0][1]
    assert keeper.failures == 8  # at 5, 6, ... 12 s; at 13 s the lease may have expired: no write


def test_a_slow_scan_counts_from_its_start() -> None:
    t = tracker()
    t.observe({"room": lease_value("a")}, now=2, started=0)
    # ended 15 s after the previous scan started: a delete marker written
    # after that start may have expired already
    assert t.observe({}, now=TTL, started=10) == []
    assert t.uncertain == 1


def test_options_are_checked() -> None:
    ClusterOptions()  # the defaults are valid
    with pytest.raises(ValueError, match="scan_every"):
        ClusterOptions(lease_ttl=10, lease_margin=2, renew_every=3, scan_every=6)
    with pytest.raises(ValueError, match="renew_every"):
        ClusterOptions(lease_ttl=10, lease_margin=2, renew_every=5)
    with pytest.raises(ValueError, match="replica_id"):
        ClusterOptions(replica_id="has.dot")
    with pytest.raises(ValueError, match="max_hops"):
        ClusterOptions(max_hops=99)


# --- expiry detection against a model of the bucket ---------------------------------------------------


ACTIONS = st.sampled_from(["keep", "release", "expire", "acquire"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(ACTIONS, min_size=3, max_size=3), st.floats(0.5, TTL * 0.95)),
        min_size=1,
        max_size=25,
    )
)
def test_only_expired_leases_become_orphans(steps: list[tuple[list[str], float]]) -> None:
    """Three rooms; between scans (less than a TTL apart) each room's lease is
    kept, released, left to expire or (when free) acquired. A released room
    is never an orphan; a room that expired is one until leased again (or
    forgotten, ``forget_after`` later)."""
    rooms = ["r0", "r1", "r2"]
    leased: dict[str, LeaseValue] = {}
    released_at: dict[str, float] = {}
    expired: dict[str, float] = {}
    t = tracker()
    now = 0.0
    for actions, gap in steps:
        now += gap
        for room, action in zip(rooms, actions, strict=True):
            if action == "acquire" and room not in leased:
                leased[room] = lease_value(f"owner{int(now)}", room)
                released_at.pop(room, None)
                expired.pop(room, None)
            elif action == "release" and room in leased:
                del leased[room]
                released_at[room] = now
            elif action == "expire" and room in leased:
                del leased[room]
                expired[room] = now
        for room in [r for r, at in released_at.items() if now - at >= TTL]:
            del released_at[room]  # the delete marker aged out
        scan: dict[str, LeaseValue | None] = dict(leased)
        scan.update(dict.fromkeys(released_at, RELEASED))
        for room in [r for r, since in expired.items() if now - since >= t.forget_after]:
            del expired[room]
        orphans = {orphan.room for orphan in t.observe(scan, now)}
        assert orphans == set(expired)
