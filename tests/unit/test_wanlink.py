"""The WAN harness's pure parts (bench/wanlink.py, bench/delay_proxy.py): the delay
line's deadlines and bounds, the wake-up compensation, the shaper and buffer sizes, the
proxy's refusals, the subnet choice and the throughput arithmetic. The link itself is
tested in tests/integration/test_wan_harness.py."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from helpers import bench_module
from hypothesis import given, settings
from hypothesis import strategies as st

wanlink = bench_module("wanlink")
delay_proxy = bench_module("delay_proxy")
DelayLine = delay_proxy.DelayLine


# --- the delay line ----------------------------------------------------------------------


def test_a_chunk_leaves_at_its_deadline_and_due_neighbours_leave_together() -> None:
    line = DelayLine(1000)
    delay = 0.0025
    for arrival, size in ((0.0, 100), (0.001, 50), (0.002, 30)):
        start, length = line.free_region(limit=1000)
        assert (start, length) == (line.used, 1000 - line.used)
        line.commit(start, size, arrival + delay)
    assert line.ready_region(0.0024) == (0, 0)
    assert line.next_deadline() == pytest.approx(0.0025)
    assert line.ready_region(0.0025) == (0, 100)
    # At 3.5 ms the first two are due (merged into one send), the third is not.
    assert line.ready_region(0.0035) == (0, 150)
    line.release(150)
    assert line.used == 30
    assert line.ready_region(0.0044) == (150, 0)
    assert line.ready_region(0.0046) == (150, 30)


def test_a_partial_send_keeps_the_rest_of_the_chunk_at_its_deadline() -> None:
    line = DelayLine(100)
    line.commit(0, 40, 1.0)
    line.commit(40, 10, 2.0)
    line.release(25)
    assert line.ready_region(1.0) == (25, 15)
    assert line.next_deadline() == 1.0
    line.release(15)
    assert line.next_deadline() == 2.0
    assert line.ready_region(1.5) == (40, 0)


def test_the_line_pushes_back_at_its_limit_and_reopens_when_bytes_leave() -> None:
    line = DelayLine(100)
    start, length = line.free_region(limit=60)
    assert (start, length) == (0, 60)
    line.commit(0, 60, 0.0)
    assert line.free_region(limit=60) == (0, 0)
    # A limit above the capacity is capped at it.
    assert line.free_region(limit=10_000) == (60, 40)
    line.release(20)
    assert line.free_region(limit=60) == (60, 20)


def test_the_ring_wraps_and_never_merges_across_its_end() -> None:
    line = DelayLine(100)
    line.commit(0, 90, 0.0)
    line.release(80)
    start, length = line.free_region(limit=100)
    assert (start, length) == (90, 10)  # contiguous room up to the end only
    line.commit(90, 10, 0.0)
    assert line.free_region(limit=100) == (0, 80)
    line.commit(0, 5, 0.0)
    assert line.ready_region(1.0) == (80, 20)
    line.release(20)
    assert line.ready_region(1.0) == (0, 5)


def test_a_commit_anywhere_but_the_tail_is_refused() -> None:
    line = DelayLine(100)
    line.commit(0, 10, 0.0)
    with pytest.raises(ValueError, match="expected the tail 10"):
        line.commit(0, 10, 0.0)
    with pytest.raises(ValueError, match="release of 11"):
        line.release(11)
    with pytest.raises(ValueError, match="capacity"):
        DelayLine(0)


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.floats(0, 0.002), st.integers(1, 300)), min_size=1, max_size=40),
    sends=st.lists(st.integers(1, 500), min_size=1, max_size=40),
    polls=st.lists(st.floats(0, 0.003), min_size=1, max_size=80),
    delay=st.floats(0, 0.05),
)
def test_bytes_leave_in_order_never_before_their_deadline_and_all_leave(
    chunks: list[tuple[float, int]], sends: list[int], polls: list[float], delay: float
) -> None:
    """A reader and a writer on a simulated clock: whatever the arrivals, the send sizes
    (partial sends) and the writer's wake-ups, every byte leaves once, in order, at or
    after arrival + delay."""
    capacity, limit = 512, 400
    line = DelayLine(capacity)
    pending = list(chunks)
    arrivals: list[tuple[float, int]] = []  # (deadline, byte index) per byte sent in
    sent: list[tuple[float, int]] = []  # (time sent, byte index)
    now, next_byte, next_out, send_i, poll_i = 0.0, 0, 0, 0, 0
    while pending or line.used:
        if pending:
            gap, size = pending[0]
            start, room = line.free_region(limit)
            if room:
                take = min(size, room)
                now += gap
                line.commit(start, take, now + delay)
                arrivals += [(now + delay, next_byte + i) for i in range(take)]
                next_byte += take
                if take == size:
                    pending.pop(0)
                else:
                    pending[0] = (0.0, size - take)
        now += polls[poll_i % len(polls)]
        poll_i += 1
        start, length = line.ready_region(now)
        if length:
            n = min(length, sends[send_i % len(sends)])
            send_i += 1
            assert start == next_out % capacity
            sent += [(now, next_out + i) for i in range(n)]
            next_out += n
            line.release(n)
        elif line.used:  # nothing due: the writer sleeps until the head's deadline
            deadline = line.next_deadline()
            assert deadline is not None and deadline > now
            now = deadline
    assert [index for _, index in sent] == list(range(sum(size for _, size in chunks)))
    assert all(at >= deadline for (at, _), (deadline, _) in zip(sent, arrivals, strict=True))


def test_the_writer_learns_to_wake_early_by_its_median_lateness() -> None:
    lateness = delay_proxy.WakeLateness(window=5, cap_s=0.0005)
    assert lateness.lead(0.0025) == 0.0
    for late in (0.00008, 0.00010, 0.00012, -0.00001, 0.2):
        lateness.observe(late)
    # Median of 80, 100, 120, 0 (negative clipped), 500 (capped) us.
    assert lateness.estimate_s == pytest.approx(0.0001)
    assert lateness.lead(0.0025) == pytest.approx(0.0001)
    # Never more than a quarter of the delay: a tiny delay is not sent early by much.
    assert lateness.lead(0.0002) == pytest.approx(0.00005)


def _timestamp(wall: float) -> list[tuple[int, int, bytes]]:
    seconds = int(wall)
    stamp = struct.pack("@qq", seconds, round((wall - seconds) * 1e9))
    return [(socket.SOL_SOCKET, delay_proxy.SO_TIMESTAMPNS, stamp)]


def test_arrival_is_the_kernels_receive_time_when_it_is_plausible() -> None:
    wall = 1_700_000_000.5
    arrived = delay_proxy.arrival_time(_timestamp(wall - 0.0001), now=50.0, wall_now=wall)
    assert arrived == pytest.approx(50.0 - 0.0001, abs=1e-6)
    # No timestamp, one from the future (clock step) or far in the past: the read's time.
    assert delay_proxy.arrival_time([], now=50.0, wall_now=wall) == 50.0
    assert delay_proxy.arrival_time(_timestamp(wall + 1), now=50.0, wall_now=wall) == 50.0
    assert delay_proxy.arrival_time(_timestamp(wall - 5), now=50.0, wall_now=wall) == 50.0


# --- the proxy's refusals and commands -------------------------------------------------


def test_the_proxy_accepts_only_a_target_inside_its_private_link() -> None:
    assert delay_proxy.checked_target("10.254.254.2:8443", "10.254.254.0/30") == (
        "10.254.254.2",
        8443,
    )
    refused = [
        ("127.0.0.1:8443", "10.254.254.0/30", "outside"),
        ("10.254.254.6:8443", "10.254.254.0/30", "outside"),
        ("10.254.254.3:8443", "10.254.254.0/30", "outside"),  # the broadcast address
        ("8.8.8.1:53", "8.8.8.0/30", "not a private network"),
        ("10.254.254.2:0", "10.254.254.0/30", "port 0"),
        ("backbone.example:443", "10.254.254.0/30", "expected IPv4:PORT"),
    ]
    for target, network, message in refused:
        with pytest.raises(ValueError, match=message):
            delay_proxy.checked_target(target, network)


def test_control_commands_change_the_delay_and_the_limit() -> None:
    state = delay_proxy.Settings(0.0, 1)
    assert delay_proxy.apply_command(state, "delay 20\n") == "ok delay 20"
    assert state.delay_s == pytest.approx(0.020)
    assert delay_proxy.apply_command(state, "limit 2048") == "ok limit 2048"
    assert state.limit == 2048
    for bad in ("delay -1", "limit 0", "connect 8.8.8.8:53", "delay"):
        with pytest.raises(ValueError, match=r"out of range|must be positive|unknown command"):
            delay_proxy.apply_command(state, bad)
    assert (state.delay_s, state.limit) == (pytest.approx(0.020), 2048)


# --- the link's parameters ---------------------------------------------------------------


def test_the_standard_profiles() -> None:
    expected = {
        "lan": (None, 0.0),
        "metro": (1000.0, 5.0),
        "wan": (100.0, 40.0),
        "poor": (20.0, 100.0),
    }
    assert {n: (p.rate_mbit, p.rtt_ms) for n, p in wanlink.PROFILES.items()} == expected
    assert wanlink.parse_profile("wan") is wanlink.PROFILES["wan"]
    assert wanlink.parse_profile("none/5") == wanlink.Profile("none/5", None, 5.0)
    assert wanlink.parse_profile("50/20") == wanlink.Profile("50/20", 50.0, 20.0)
    for bad in ("moon", "0/5", "10/-1", "fast/5"):
        with pytest.raises(ValueError, match="unknown profile"):
            wanlink.parse_profile(bad)


def test_tbf_bursts_two_ms_and_queues_ten_more_with_floors_for_slow_links() -> None:
    assert wanlink.tbf_params(wanlink.PROFILES["lan"]) is None
    metro = wanlink.tbf_params(wanlink.PROFILES["metro"])
    assert (metro.rate_bit, metro.burst_bytes, metro.limit_bytes) == (
        1_000_000_000,
        250_000,
        250_000 + 1_250_000,
    )
    assert metro.tc_args() == [
        "tbf",
        "rate",
        "1000000000bit",
        "burst",
        "250000",
        "limit",
        "1500000",
    ]
    poor = wanlink.tbf_params(wanlink.PROFILES["poor"])
    # 2 ms of 20 Mbit/s is 5000 bytes, 10 ms 25000: the floors (16 KiB, 256 KiB) apply.
    assert (poor.burst_bytes, poor.limit_bytes) == (16 << 10, (16 << 10) + (256 << 10))


def test_the_proxy_holds_four_times_rate_times_delay_and_its_ring_fits_every_profile() -> None:
    metro, wan, poor = (wanlink.PROFILES[n] for n in ("metro", "wan", "poor"))
    assert wanlink.proxy_limit(metro) == 4 * 125_000_000 * 0.0025 == 1_250_000
    # 4 x 12.5 MB/s x 20 ms = 1 MB, 4 x 2.5 MB/s x 50 ms = 0.5 MB: the 1 MiB floor.
    assert wanlink.proxy_limit(wan) == wanlink.proxy_limit(poor) == 1 << 20
    for profile in wanlink.PROFILES.values():
        assert wanlink.proxy_limit(profile) >= 1 << 20
        if profile.rate_mbit is not None:
            # Room for the bytes in flight at full rate, with headroom.
            in_flight = profile.rate_mbit * 1e6 / 8 * profile.one_way_ms / 1000
            assert wanlink.proxy_limit(profile) >= 4 * in_flight
    slow_far = wanlink.Profile("far", 1000.0, 100.0)
    capacity = wanlink.proxy_capacity(slow_far)
    assert capacity == wanlink.proxy_limit(slow_far) == 25_000_000
    assert all(wanlink.proxy_limit(p) <= capacity for p in wanlink.PROFILES.values())


def test_bulk_transfers_last_about_the_seconds_asked_for() -> None:
    assert wanlink.bulk_bytes(wanlink.PROFILES["wan"], 1.5) == 18_750_000
    assert wanlink.bulk_bytes(wanlink.PROFILES["lan"], 1.5) == wanlink.UNSHAPED_BULK_BYTES


def test_the_link_subnet_avoids_every_host_route() -> None:
    net = ipaddress.IPv4Network
    assert wanlink.choose_subnet([net("192.0.2.0/24")]) == net("10.254.254.0/30")
    assert wanlink.choose_subnet([net("10.254.254.0/30")]) == net("10.254.254.4/30")
    assert wanlink.choose_subnet([net("10.0.0.0/8")]) == net("172.31.254.0/30")
    everything = [net("10.0.0.0/8"), net("172.16.0.0/12"), net("192.168.0.0/16")]
    with pytest.raises(wanlink.WanLinkError, match="overlaps"):
        wanlink.choose_subnet(everything)


def test_the_steady_rate_leaves_out_the_burst_at_the_start() -> None:
    # 1 MB at once (the shaper's burst, buffers filling), then 100 kB every 10 ms.
    timeline = [(0.0, 0), (0.001, 1_000_000)]
    timeline += [(0.001 + 0.01 * i, 1_000_000 + 100_000 * i) for i in range(1, 51)]
    assert wanlink.steady_rate(timeline) == pytest.approx(10_000_000)
    assert wanlink.steady_rate([(0.0, 0), (2.0, 10)]) == pytest.approx(5)
    with pytest.raises(ValueError, match="two reads"):
        wanlink.steady_rate([(0.0, 10)])
    with pytest.raises(ValueError, match="no time"):
        wanlink.steady_rate([(1.0, 0), (1.0, 10)])


def test_a_check_compares_only_what_the_profile_sets() -> None:
    check = wanlink.LinkCheck
    lan = check(wanlink.PROFILES["lan"], rtt_ms=0.02, up_mbit=9000.0, down_mbit=11000.0)
    assert lan.deviations() == {}
    assert lan.within()
    wan = check(wanlink.PROFILES["wan"], rtt_ms=41.0, up_mbit=95.0, down_mbit=89.0)
    deviations = wan.deviations()
    assert deviations == pytest.approx({"rtt": 0.025, "up": -0.05, "down": -0.11})
    assert not wan.within()
    assert wan.within(tolerance=0.12)
    assert "down 89 Mbit/s (-11.0%) OFF" in wan.summary()
    delay_only = check(wanlink.Profile("none/5", None, 5.0), 5.1, 4000.0, 4000.0)
    assert set(delay_only.deviations()) == {"rtt"}
