"""Which buckets the ingress drop lets through (held.py, pure)."""

from __future__ import annotations

from node_service.farm import held
from node_service.farm.held import Entry, after_load, after_reading, held_buckets, starting
from node_service.farm.nft import ALL_BUCKETS, MARK_BASE, FilterRule

RULES = (FilterRule("tcp", (80, 443), "ip_port"), FilterRule("udp", (53,), "ip"))
VIP = "198.51.100.201"


def test_at_start_every_bucket_is_held_until_conntrack_is_read():
    hold = starting(10.0)
    assert hold.held == ALL_BUCKETS and hold.check_at == 10.0
    loaded = after_load(frozenset(), frozenset({1, 2}), hold, 10.5)
    assert loaded.held == ALL_BUCKETS - {1, 2} and loaded.check_at == 10.0
    read = after_reading(frozenset({1, 2}), frozenset(), loaded, 11.0)
    assert read.held == frozenset() and read.check_at is None
    assert "no flow of this node left" in read.reason


def test_buckets_lost_are_held_at_once_and_read_again_after_the_grace():
    hold = after_reading(frozenset({1, 2, 3}), frozenset(), starting(0.0), 1.0)
    moved = after_load(frozenset({1, 2, 3}), frozenset({1}), hold, 5.0)
    assert moved.held == frozenset({2, 3})
    assert moved.check_at == 5.0 + held.GRACE_S and "2 bucket(s) moved away" in moved.reason
    # A reading before the grace is over may predate the last flows: ignored.
    assert after_reading(frozenset({1}), frozenset(), moved, 5.5) == moved
    still = after_reading(frozenset({1}), frozenset({1, 3}), moved, 6.5)
    assert still.held == frozenset({3}) and still.check_at == 6.5 + held.EVERY_S
    assert "1 bucket(s) not owned still hold flows" in still.reason
    done = after_reading(frozenset({1}), frozenset({1}), still, 8.0)
    assert done.held == frozenset() and done.check_at is None


def test_a_bucket_owned_again_is_no_longer_held():
    hold = after_load(frozenset({1, 2}), frozenset({1}), starting(0.0), 1.0)
    back = after_load(frozenset({1}), frozenset({1, 2}), hold, 1.5)
    assert back.held == ALL_BUCKETS - {1, 2}  # still every other bucket, from the start


def test_only_marked_entries_to_the_modules_vips_and_ports_count():
    entries = [
        Entry(VIP, 6, 80, MARK_BASE + 7),
        Entry(VIP, 6, 443, MARK_BASE + 255),
        Entry(VIP, 17, 53, MARK_BASE + 0),
        Entry(VIP, 6, 8080, MARK_BASE + 9),  # another port: another module
        Entry("198.51.100.202", 6, 80, MARK_BASE + 10),  # another VIP
        Entry(VIP, 17, 80, MARK_BASE + 11),  # udp on a tcp port
        Entry(VIP, 6, 80, 0x1234_0005),  # someone else's mark
    ]
    assert held_buckets(entries, [VIP], RULES) == frozenset({0, 7, 255})
