"""Pure logic of the stream worker: flow merging (duplicates, reordering, both ends, tuple
reuse), flow events, ECS/OCSF documents, Community ID vectors, the window statistics, and the
flows stage's choice of the flows due at a tick."""

from __future__ import annotations

import ipaddress
import json
import queue
import random
import time
from collections import defaultdict
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import communityid
import fastavro
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import schemas
from streams import ecs, ocsf
from streams.flows import (
    NEVER,
    Clock,
    DueIndex,
    Emission,
    FlowConfig,
    FlowState,
    LocalAddresses,
    Observation,
    activity,
    due,
    expired,
    network,
    next_due,
    normalize_ip,
    observe,
)
from streams.meta import Awaiting, MetaCache
from streams.raw import Listeners, from_netlink
from streams.records import community_id, flow_record
from streams.windows import EntityState, RttAgg, WindowConfig

T0 = 1_700_000_000_000_000_000  # event time origin, ns
CFG = FlowConfig(active_timeout_s=10, idle_timeout_s=60, join_delay_s=2, end_grace_s=2, linger_s=30)
CID_A = "a" * 64
CID_B = "b" * 64


def at(t_ms: int) -> Clock:
    """``t_ms`` after the event time origin on a caught-up worker: processing time and
    watermark are the same instant."""
    return Clock(T0 // 1_000_000 + t_ms, T0 + t_ms * 1_000_000)


def obs(cookie: int, role: str, kind: str, t_ms: int, sent: int = 0, received: int = 0,
        **extra: object) -> Observation:
    """A socket of the loopback connection 127.0.0.1:40000 -> 127.0.0.1:8080."""
    client = role == "client"
    values = dict(host="h1", cookie=cookie, ts_ns=T0 + t_ms * 1_000_000, source="ebpf", kind=kind,
                  transport="tcp", local_ip="127.0.0.1", local_port=40000 if client else 8080,
                  remote_ip="127.0.0.1", remote_port=8080 if client else 40000, role=role,
                  bytes_sent=sent, bytes_received=received, packets_sent=sent // 100,
                  packets_received=received // 100, retransmits=0, srtt_us=50 + t_ms,
                  rttvar_us=10, state="ESTABLISHED",
                  process={"pid": 100 if client else 200, "comm": "curl" if client else "nginx",
                           "args": []},
                  container_id=CID_A if client else CID_B,
                  closed=kind in ("END", "FAILURE"), failed=kind == "FAILURE")
    values.update(extra)
    return Observation(**values)  # type: ignore[arg-type]


EMITTED: list[Emission] = []


def run(observations: list[Observation], ticks: list[int]) -> tuple[FlowState, list[tuple[str, int]]]:
    """Feed observations at processing time 0 then tick; returns state and (type, seq) events
    (the emissions themselves are left in EMITTED)."""
    state = None
    EMITTED.clear()
    for o in observations:
        state, owed, _ = observe(state, o, at(0))
        EMITTED.extend(e for _s, e in owed)
        EMITTED.extend(due(state, at(0), CFG))
    assert state is not None
    for now in ticks:
        EMITTED.extend(due(state, at(now), CFG))
    return state, [(e.type, e.sequence) for e in EMITTED]


def loopback_flow() -> list[Observation]:
    return [obs(1, "client", "START", 0), obs(2, "server", "START", 1),
            obs(1, "client", "UPDATE", 1000, 500, 20000), obs(2, "server", "UPDATE", 1000, 20000, 500),
            obs(1, "client", "END", 2000, 600, 30000, state="CLOSE"),
            obs(2, "server", "END", 2001, 30000, 600, state="CLOSE")]


def test_both_ends_merge_into_one_flow() -> None:
    state, events = run(loopback_flow(), [100, 20_000])
    assert events == [("START", 0), ("END", 1)]
    assert len(state.sockets) == 2
    rec = flow_record(state, EMITTED[-1], MetaCache(), 0)
    assert rec["client"]["port"] == 40000 and rec["server"]["port"] == 8080
    assert rec["client"]["process"]["comm"] == "curl" and rec["server"]["process"]["comm"] == "nginx"
    assert rec["client_bytes"] == 600 and rec["server_bytes"] == 30000
    assert rec["client"]["container"]["id"] == CID_A and rec["server"]["container"]["id"] == CID_B
    fastavro.validate(rec, fastavro.parse_schema(schemas.load("Flow")), strict=True)


def test_duplicates_and_reordering_give_the_same_state() -> None:
    base, _ = run(loopback_flow(), [])
    rng = random.Random(7)
    for _ in range(20):
        shuffled = loopback_flow() * 2
        rng.shuffle(shuffled)
        state, events = run(shuffled, [100, 20_000])
        assert {k: s.bytes_sent for k, s in state.sockets.items()} == {
            k: s.bytes_sent for k, s in base.sockets.items()}
        assert {k: s.srtt_us for k, s in state.sockets.items()} == {
            k: s.srtt_us for k, s in base.sockets.items()}
        assert all(s.closed for s in state.sockets.values())
        assert [t for t, _ in events] == ["START", "END"]
        assert state.flow_id  # deterministic for a given first observation


def test_start_waits_for_the_other_end_then_goes_alone() -> None:
    state, events = run([obs(1, "client", "START", 0)], [1000, 2500])
    assert events == [("START", 0)]
    assert len(state.sockets) == 1


def test_lagging_worker_waits_for_the_peer_in_event_time() -> None:
    """A worker behind its input reads the client's START and END long (in processing time)
    before the server's: while the watermark has not passed the client's events by the join
    delay and END grace it emits nothing, then one START and one END with both ends. A
    caught-up worker (watermark = wall clock) ends a lone socket one grace after it arrived,
    also when its host's clock is behind or ahead."""
    now0 = T0 // 1_000_000 + 60_000  # the worker reads the events a minute late
    lagging = Clock(now0, T0 + 500_000_000)  # the server's raw partition is read up to 0.5 s
    state = None
    for o in (obs(1, "client", "START", 0), obs(1, "client", "END", 1000, 600, 30000,
                                                    state="CLOSE")):
        state, _, _ = observe(state, o, lagging)
    assert next_due(state, CFG) == (NEVER, T0 + 1_000_000_000 + round(CFG.end_grace_s * 1e9))
    for later_ms in (0, 5000, 100_000):  # processing time runs, the watermark does not
        assert due(state, Clock(now0 + later_ms, lagging.watermark_ns), CFG) == []
    events = []
    read_server = Clock(now0 + 100_000, T0 + 1_500_000_000)
    for o in (obs(2, "server", "START", 1), obs(2, "server", "END", 1001, 30000, 600,
                                                    state="CLOSE")):
        state, _, _ = observe(state, o, read_server)
        events += due(state, read_server, CFG)
    assert [(e.type, e.sequence) for e in events] == [("START", 0), ("END", 1)]
    assert due(state, at(3_600_000), CFG) == []  # no corrective END
    rec = flow_record(state, events[-1], MetaCache(), now0)
    assert rec["client"]["local"] and rec["server"]["local"] and rec["server_bytes"] == 30000

    for skew_ms in (0, -60_000, 60_000):  # a lone client socket; its host's clock right, behind
        # or ahead by a minute
        state, _, _ = observe(None, obs(1, "client", "END", skew_ms, state="CLOSE"), at(0))
        assert due(state, at(1999), CFG) == []
        assert [e.type for e in due(state, at(2000), CFG)] == ["START", "END"]


def test_update_at_active_timeout_only_when_changed() -> None:
    state = None
    for o in loopback_flow()[:2]:
        state, _, _ = observe(state, o, at(0))
    assert [e.type for e in due(state, at(0), CFG)] == ["START"]
    assert due(state, at(11_000), CFG) == []  # nothing changed since START
    state, _, _ = observe(state, obs(1, "client", "UPDATE", 5000, 10, 10), at(12_000))
    assert due(state, at(13_000), CFG)[0].type == "UPDATE"
    assert due(state, at(14_000), CFG) == []


def test_idle_flow_ends() -> None:
    _state, events = run([obs(1, "client", "START", 0), obs(2, "server", "START", 1)], [61_000])
    assert events == [("START", 0), ("END", 1)]


def test_failed_connect_is_one_end_event() -> None:
    o = obs(5, "client", "FAILURE", 0, error="ECONNREFUSED", state="CLOSE")
    state, events = run([o], [5000])
    assert events == [("END", 0)]
    rec = flow_record(state, EMITTED[-1], MetaCache(), 0)
    assert rec["end_reason"] == "failed" and rec["error"] == "ECONNREFUSED"
    docs = ecs.documents(rec)
    assert [d["event"]["action"] for d in docs] == ["connection_failed"]
    assert ocsf.events(rec)[0]["activity_id"] == 5


def test_tuple_reuse_starts_a_new_flow_and_ignores_the_old_sockets() -> None:
    state = None
    for o in loopback_flow():
        state, _, _ = observe(state, o, at(0))
    due(state, at(0), CFG)
    first = state.flow_id
    state, owed, _ = observe(state, obs(11, "client", "START", 90_000), at(1000))
    assert owed == [] and state.flow_id != first and list(state.sockets) == ["11"]
    state, _, changed = observe(state, obs(2, "server", "END", 2001, 30000, 600), at(1000))
    assert changed is None and list(state.sockets) == ["11"]


def test_netlink_snapshot_joins_ebpf_socket_by_cookie() -> None:
    state = None
    for o in loopback_flow()[:2]:
        state, _, _ = observe(state, o, at(0))
    snap = replace(obs(1, "client", "SOCKET", 1500, 550, 25000), source="netlink", role=None,
                   local_ip="::ffff:127.0.0.1", remote_ip="::ffff:127.0.0.1", process=None)
    assert snap.flow_key() == loopback_flow()[0].flow_key()
    state, _, changed = observe(state, snap, at(0))
    assert changed is not None and state.sockets["1"].bytes_received == 25000
    assert state.sockets["1"].role == "client" and state.sockets["1"].process["comm"] == "curl"


def test_netlink_bytes_sent_are_payload() -> None:
    """tcp_info's bytes_acked counts a client's SYN and an acknowledged FIN: the observation
    takes the payload (bounded by bytes_sent), not one or two bytes more."""
    def snapshot(state: str, acked: int, sent: int) -> dict[str, Any]:
        sock = {"cookie": 1, "transport": "tcp", "state": state, "local_ip": "10.0.0.1",
                "local_port": 40000, "remote_ip": "10.0.0.2", "remote_port": 80,
                "tcp": {"bytes_acked": acked, "bytes_sent": sent, "bytes_received": 5}}
        return {"kind": "SOCKET", "host_name": "h", "timestamp_ms": 1, "netns_inode": None,
                "socket": sock}
    got = [from_netlink(snapshot(s, a, b), Listeners()).bytes_sent
           for s, a, b in (("ESTABLISHED", 101, 100), ("FIN_WAIT2", 102, 100),
                           ("ESTABLISHED", 61, 100), ("ESTABLISHED", 28, 0))]
    # 40 bytes in flight, the SYN still counted; a kernel without tcpi_bytes_sent (< 4.19)
    assert got == [100, 100, 61, 28]


@pytest.mark.parametrize("client_start", [True, False])
def test_netlink_time_wait_does_not_end_a_flow_before_its_ebpf_end(client_start: bool) -> None:
    """A snapshot of the client in TIME_WAIT (no tcp_info) read before the client's eBPF END
    (raw topics and partitions are not ordered with each other): END waits for the eBPF END
    (or the grace) instead of going out with the client's bytes at 0."""
    time_wait = replace(obs(1, "client", "SOCKET", 1500), source="netlink", role=None,
                        state="TIME_WAIT", bytes_sent=None, bytes_received=None,
                        packets_sent=None, packets_received=None, srtt_us=None)
    first = [obs(1, "client", "START", 0)] if client_start else []
    flow = [*first, obs(2, "server", "START", 1), time_wait,
            obs(2, "server", "END", 2001, 30000, 600, state="CLOSE")]
    state = None
    for o in flow:
        state, _, _ = observe(state, o, at(0))
        assert "END" not in [e.type for e in due(state, at(0), CFG, peer_may_come=False)]
    state, _, _ = observe(state, obs(1, "client", "END", 2000, 600, 30000, state="CLOSE"), at(100))
    (end,) = [e for e in due(state, at(100), CFG, peer_may_come=False) if e.type == "END"]
    assert flow_record(state, end, MetaCache(), 100)["client_bytes"] == 600


def test_netlink_only_flow_ends_when_both_ends_closed() -> None:
    netlink = [replace(o, source="netlink", kind="SOCKET_CLOSED" if o.closed else "SOCKET")
               for o in loopback_flow()]
    state = None
    for o in netlink:
        state, _, _ = observe(state, o, at(0))
    assert [e.type for e in due(state, at(0), CFG, peer_may_come=False)] == ["START", "END"]


def test_ecs_document_fields_and_types() -> None:
    state, _ = run(loopback_flow(), [100])
    meta = MetaCache()
    meta.add_container(CID_A, {"id": CID_A, "name": "web", "image": "nginx:1", "runtime": "docker",
                               "labels": {"a": "b"}, "timestamp_ms": 1, "pod_name": "p1",
                               "pod_namespace": "ns"})
    rec = flow_record(state, EMITTED[-1], meta, 5)
    client_doc, server_doc = ecs.documents(rec)
    assert client_doc["source"] == {"ip": "127.0.0.1", "port": 40000, "bytes": 600, "packets": 6}
    assert client_doc["destination"]["port"] == 8080
    assert server_doc["source"]["port"] == 40000  # the initiator, from the server's view too
    assert client_doc["network"]["direction"] == "egress"
    assert server_doc["network"]["direction"] == "ingress"
    assert client_doc["network"]["iana_number"] == "6"
    assert client_doc["network"]["community_id"] == community_id("tcp", "127.0.0.1", 40000,
                                                                 "127.0.0.1", 8080)
    assert client_doc["event"]["action"] == "flow_end" and client_doc["event"]["kind"] == "event"
    assert isinstance(client_doc["event"]["duration"], int) and client_doc["event"]["duration"] > 0
    assert client_doc["container"]["name"] == "web"
    assert client_doc["orchestrator"] == {"type": "kubernetes", "namespace": "ns",
                                          "resource": {"type": "pod", "name": "p1"}}
    assert client_doc["packetless"]["peer"]["process"]["name"] == "nginx"
    assert server_doc["packetless"]["peer"]["container"]["name"] == "web"
    assert client_doc["packetless"]["tcp"]["state"] == "CLOSE"
    ev = ocsf.events(rec)[0]
    assert ev["class_uid"] == 4001 and ev["type_uid"] == 400102
    assert ev["traffic"]["bytes_out"] == 600 and ev["src_endpoint"]["port"] == 40000


@pytest.mark.parametrize(("transport", "src", "sport", "dst", "dport", "expected"), [
    ("tcp", "128.232.110.120", 34855, "66.35.250.204", 80, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    ("tcp", "66.35.250.204", 80, "128.232.110.120", 34855, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    ("udp", "192.168.1.52", 54585, "8.8.8.8", 53, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    ("tcp", "2001:470:e5bf:dead:4957:2174:e82c:4887", 63943, "2607:f8b0:400c:c03::1a", 25,
     "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
])
def test_community_id_reference_vectors(transport: str, src: str, sport: int, dst: str, dport: int,
                                        expected: str) -> None:
    assert community_id(transport, src, sport, dst, dport) == expected


_ports = st.integers(0, 65535)


@given(st.sampled_from(["tcp", "udp"]), st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6))), _ports, _ports)
def test_community_id_equals_the_reference_package(transport: str, ips: tuple[Any, Any],
                                                   sport: int, dport: int) -> None:
    """Our hashlib Community ID against the ``communityid`` package on arbitrary tuples."""
    src, dst = (str(ip) for ip in ips)
    make = communityid.FlowTuple.make_tcp if transport == "tcp" else communityid.FlowTuple.make_udp
    expected = communityid.CommunityID().calc(make(src, dst, sport, dport))
    assert community_id(transport, src, sport, dst, dport) == expected


def feed_passes(passes: list[list[tuple[int, str, int, int, int, int | None]]],
                cfg: WindowConfig, forget_flows: bool = True) -> EntityState:
    """Socket observations (cookie, role, t_ms, bytes_in, bytes_out, srtt) of container A,
    through the flow stage's ``activity`` into the windows, pass by pass; with
    ``forget_flows`` the flow stage's state is lost before each pass (a crash, or the flows
    expired between)."""
    entity = EntityState(entity=CID_A, entity_type="CONTAINER")
    flows: dict[int, FlowState] = {}
    for events in passes:
        if forget_flows:
            flows = {}
        for cookie, role, t_ms, b_in, b_out, rtt in events:
            o = obs(cookie, role, "UPDATE", t_ms, b_out, b_in, srtt_us=rtt, rttvar_us=5,
                    local_port=40000 + cookie if role == "client" else 8080,
                    remote_port=8080 if role == "client" else 40000 + cookie)
            state, _, sock = observe(flows.get(cookie), o, at(0))
            flows[cookie] = state
            if sock is not None:
                for a in activity(state, sock, CID_A, None, cfg.step_ms):
                    entity.apply(a, cfg)
    return EntityState.from_dict(entity.to_dict())  # through JSON-able state


def feed(events: list[tuple[int, str, int, int, int, int | None]], cfg: WindowConfig,
         replay: int = 1, forget_flows: bool = False) -> EntityState:
    """``events`` fed ``replay`` times (see ``feed_passes``)."""
    return feed_passes([events] * replay, cfg, forget_flows)


def test_windows_count_deltas_once_and_emit_tumbling_and_hopping() -> None:
    cfg = WindowConfig(step_s=10, hop_s=60, grace_s=5)
    base = T0 // 1_000_000 // 10_000 * 10_000
    off = base - T0 // 1_000_000  # t_ms of the step start
    events = [(1, "client", off + 1000, 100, 50, 100), (1, "client", off + 3000, 300, 70, 200),
              (2, "server", off + 4000, 10, 1000, 1000), (1, "client", off + 12_000, 400, 70, 300)]
    e = feed(events, cfg, replay=2)  # the second pass is all duplicates
    again = feed(events, cfg, replay=3, forget_flows=True)  # each pass replayed after a crash
    assert again.close(base + 10_000 + 5000, cfg) == e.close(base + 10_000 + 5000, cfg)
    e = feed(events, cfg)
    recs = e.close(base + 10_000 + 5000, cfg)
    tumbling = [r for r in recs if r["window_size_ms"] == 10_000]
    hopping = [r for r in recs if r["window_size_ms"] == 60_000]
    assert len(tumbling) == 1 and len(hopping) == 1
    t = tumbling[0]
    assert (t["bytes_in"], t["bytes_out"]) == (310, 1070)
    assert (t["flows_as_client"], t["flows_as_server"], t["flows_started"]) == (1, 1, 2)
    assert t["rtt_as_client"]["samples"] == 2 and t["rtt_as_client"]["mean_us"] == 150
    assert t["rtt_as_client"]["variance_us2"] == 2500
    assert t["rtt_as_server"]["p50_us"] == pytest.approx(1000, rel=0.01)
    assert e.close(base + 10_000 + 5000, cfg) == []  # emitted once
    later = e.close(base + 20_000 + 5000, cfg)
    hop = next(r for r in later if r["window_size_ms"] == 60_000)
    assert hop["bytes_in"] == 410 and hop["window_end_ms"] == base + 20_000
    assert hop["rtt_as_client"]["samples"] == 3
    assert (hop["flows_as_client"], hop["flows_as_server"]) == (1, 1)  # socket 1 counted once
    late = feed([(3, "client", off + 1500, 500, 70, 50)], cfg)
    late.emitted_upto_ms = base + 20_000
    assert not late.apply(activity(*_one_socket(3, off + 1500), CID_A, None, cfg.step_ms)[0], cfg)


def test_tcp_socket_resumed_after_an_idle_end_is_not_counted_again() -> None:
    """A TCP connection idle long enough to end its flow, then active again: the new flow
    carries the socket's counters since its start; the windows count only what is new."""
    cfg = WindowConfig(step_s=10, hop_s=60, grace_s=5)
    base = T0 // 1_000_000 // 10_000 * 10_000
    off = base - T0 // 1_000_000
    before = [(1, "client", off + 1000, 100, 50, None)]
    after = [(1, "client", off + 5000, 300, 70, None)]
    e = feed(before + after, cfg, replay=1)
    resumed = feed_passes([before, after], cfg)  # the flow state forgotten in between
    assert resumed.close(base + 15_000, cfg) == e.close(base + 15_000, cfg)
    assert e.close(base + 15_000, cfg) == [] and resumed.buckets[str(base)].bytes_in == 300


def _one_socket(cookie: int, t_ms: int) -> tuple[FlowState, object]:
    state, _, sock = observe(None, obs(cookie, "client", "START", t_ms, 1, 1), at(0))
    return state, sock


def test_distinct_flows_across_steps() -> None:
    cfg = WindowConfig(step_s=10, hop_s=30, grace_s=0)
    base = T0 // 1_000_000 // 10_000 * 10_000
    off = base - T0 // 1_000_000
    # socket 1 active in steps 0, 1, 2; socket 2 in steps 0 and 2; socket 3 in step 1 only
    events = [(1, "client", off + 1, 1, 1, None), (2, "client", off + 2, 1, 1, None),
              (1, "client", off + 10_001, 2, 2, None), (3, "client", off + 10_002, 1, 1, None),
              (1, "client", off + 20_001, 3, 3, None), (2, "client", off + 20_002, 2, 2, None)]
    e = feed(events, cfg)
    recs = e.close(base + 30_000, cfg)
    tumbling = {r["window_start_ms"] - base: r["flows_as_client"] for r in recs
                if r["window_size_ms"] == 10_000}
    hopping = {r["window_start_ms"] - base: r["flows_as_client"] for r in recs
               if r["window_size_ms"] == 30_000}
    assert tumbling == {0: 2, 10_000: 2, 20_000: 2}
    assert hopping == {-20_000: 2, -10_000: 3, 0: 3}


def test_rtt_sketch_quantiles_are_mergeable() -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(6, 1) for _ in range(5000)]
    a, b, whole = RttAgg(), RttAgg(), RttAgg()
    for i, v in enumerate(values):
        (a if i % 2 else b).add(v, None)
        whole.add(v, None)
    a.merge(b)
    exact = sorted(values)
    for q, name in ((0.5, "p50_us"), (0.95, "p95_us"), (0.99, "p99_us")):
        assert a.stats()[name] == whole.stats()[name]
        assert a.stats()[name] == pytest.approx(exact[int(q * (len(exact) - 1))], rel=0.02)


def test_activity_for_container_and_pod() -> None:
    state, _ = run(loopback_flow(), [])
    sock = state.sockets["1"]
    cfg = WindowConfig()
    acts = activity(state, sock, CID_A, "ns/p1", cfg.step_ms)
    assert [(a.entity_type, a.entity, a.role, a.bytes_out) for a in acts] == [
        ("CONTAINER", CID_A, "client", 600), ("POD", "ns/p1", "client", 600)]
    assert activity(state, sock, CID_A, "ns/p1", cfg.step_ms) == []  # reported
    cm = fastavro.parse_schema(schemas.load("ContainerMetrics"))
    e = EntityState(entity="ns/p1", entity_type="POD")
    for a in acts:
        e.apply(a, cfg)
    assert sock.closed and list(e.sockets) == ["1"]  # a TCP socket: by its cookie
    for rec in e.close(T0 // 1_000_000 + 100_000, cfg):
        fastavro.validate(rec, cm, strict=True)
    assert e.idle()  # its windows emitted, the closed socket forgotten
    assert not e.apply(acts[1], cfg)  # and its replay is late: not counted again


def test_late_metadata_reemits_and_next_due() -> None:
    state = None
    for o in loopback_flow()[:2]:
        state, _, _ = observe(state, o, at(0))
    assert [e.type for e in due(state, at(0), CFG, "sig-unknown")] == ["START"]
    # nothing else pending: idle from when it was read (the 1 ms event was read at 0 ms)
    assert next_due(state, CFG) == (NEVER, T0 + round(CFG.idle_timeout_s * 1e9))
    assert [e.type for e in due(state, at(500), CFG, "sig-known")] == ["UPDATE"]
    for o in loopback_flow()[4:]:
        state, _, _ = observe(state, o, at(1000))
    assert [e.type for e in due(state, at(1000), CFG, "sig-known")] == ["END"]
    # the closes (events at 2,001 ms, read at 1,000 ms) count from when they were read
    assert next_due(state, CFG) == (NEVER, T0 + 1_000_000_000 + round(CFG.linger_s * 1e9))
    assert [e.type for e in due(state, at(2000), CFG, "sig-more")] == ["END"]  # corrected END
    assert not expired(state, at(999 + CFG.linger_s * 1000), CFG)
    assert expired(state, at(1000 + CFG.linger_s * 1000), CFG)


def test_udp_flow_restarting_on_the_same_socket_is_a_new_flow() -> None:
    def udp(kind: str, t_ms: int, sent: int) -> Observation:
        return obs(7, "client", kind, t_ms, sent, 0, transport="udp", srtt_us=None,
                   state=None, closed=kind == "END")

    state = None
    for o in (udp("START", 0, 10), udp("END", 30_000, 50)):
        state, _, _ = observe(state, o, at(0))
    due(state, at(5000), CFG)  # after the end grace: no other end showed up
    assert state.ended
    first = state.flow_id
    state, owed, sock = observe(state, udp("START", 60_000, 5), at(1))
    assert owed == [] and state.flow_id != first and sock is not None and sock.bytes_sent == 5
    state, _, sock = observe(state, udp("END", 30_000, 50), at(1))  # late event of the first flow
    assert sock is None and state.sockets["7"].bytes_sent == 5


def by_key(observations: list[Observation], ticks: list[int]) -> tuple[dict[str, FlowState],
                                                                        list[tuple[str, Emission]]]:
    """Observations folded into a table by flow key, as the flows stage does; then ticks.
    Returns the table and the (flow key, emission) pairs in order."""
    table: dict[str, FlowState] = {}
    out: list[tuple[str, Emission]] = []
    for o in observations:
        key = o.flow_key()
        state, owed, _ = observe(table.get(key), o, at(0))
        out += [(old.key, e) for old, e in owed]
        table[key] = state
        out += [(key, e) for e in due(state, at(0), CFG)]
    for now in ticks:
        out += [(key, e) for key, state in table.items() for e in due(state, at(now), CFG)]
    return table, out


def test_same_loopback_tuple_in_two_namespaces_is_two_flows() -> None:
    """127.0.0.1:40000 -> 127.0.0.1:8080 in two network namespaces at once (two containers,
    each with its own loopback): two flows of two sockets each, with their own bytes; not one
    flow whose sockets keep replacing each other."""
    def in_ns(o: Observation, netns: int, cookie_offset: int, scale: int) -> Observation:
        return replace(o, netns_inode=netns, cookie=o.cookie + cookie_offset,
                       bytes_sent=(o.bytes_sent or 0) * scale,
                       bytes_received=(o.bytes_received or 0) * scale)

    a = [in_ns(o, 4026532001, 0, 1) for o in loopback_flow()]
    b = [in_ns(o, 4026532002, 10, 3) for o in loopback_flow()]
    table, events = by_key([o for pair in zip(a, b, strict=True) for o in pair], [100, 20_000])
    assert len(table) == 2
    ends = {key: e for key, e in events if e.type == "END"}
    assert {e.end_reason for e in ends.values()} == {"closed"}  # none ended as a reused tuple
    totals = {}
    for key in ends:
        state = table[key]
        assert sorted(state.sockets) == (["1", "2"] if "4026532001" in key else ["11", "12"])
        rec = flow_record(state, ends[key], MetaCache(), 0)
        assert rec["client"]["local"] and rec["server"]["local"]
        totals[rec["client"]["netns_inode"]] = (rec["client_bytes"], rec["server_bytes"])
    assert totals == {4026532001: (600, 30000), 4026532002: (1800, 90000)}


def test_connection_between_two_namespaces_is_one_flow() -> None:
    """A container's client and another container's server on a bridge: each socket in its own
    namespace, one flow with both ends (the namespace keys only flows that stay in one)."""
    def bridged(o: Observation) -> Observation:
        client = o.local_port == 40000
        return replace(o, local_ip="172.18.0.2" if client else "172.18.0.3",
                       remote_ip="172.18.0.3" if client else "172.18.0.2",
                       netns_inode=4026532001 if client else 4026532002)

    table, events = by_key([bridged(o) for o in loopback_flow()], [100, 20_000])
    (state,) = table.values()
    assert state.both_ends() and [e.type for _, e in events] == ["START", "END"]


def test_internal_messages_are_split_to_fit_kafka() -> None:
    """A batch of observations with long command lines is several megabytes: it goes in parts
    that each fit one Kafka message, in order, nothing dropped."""
    from streams.app import MESSAGE_BYTES, _fitting, _json

    rows = [[i, "x" * (30_000 if i % 7 == 0 else 300)] for i in range(2000)]
    parts = list(_fitting(rows))
    assert len(parts) > 1 and all(len(data) <= MESSAGE_BYTES for data in parts)
    assert [row for data in parts for row in orjson.loads(data)] == rows
    assert list(_fitting(rows[:3])) == [_json(rows[:3])]


def test_flow_state_of_an_earlier_version_is_read() -> None:
    """A table value written before the waits counted event time (``seen_ms``, ``changed_ms``,
    ``ended_ms``) still loads: its waits are over."""
    state, _ = run(loopback_flow()[:2], [])
    old = state.to_dict()
    for name in ("seen_ns", "changed_ns", "ended_ns"):
        old[name.replace("_ns", "_ms")] = old.pop(name) // 1_000_000
    restored = FlowState.from_dict(orjson.loads(orjson.dumps(old)))
    assert restored.changed_ns == 0 and len(restored.sockets) == 2
    assert [e.type for e in due(restored, at(0), CFG)] == ["END"]  # idle long since


def test_enrichment_signature_keeps_the_stored_format() -> None:
    """The signature is kept in the flows table: its text stays the JSON of [containers known,
    executables known] that earlier versions stored, or every stored flow would look
    re-enriched (an UPDATE or a second END) after an upgrade."""
    meta = MetaCache()
    meta.containers[CID_A] = {"id": CID_A}
    meta.processes[("h1", 100)] = {"pid": 100, "exe": "/usr/bin/curl"}
    cases = [([], []), ([CID_A], [{"pid": 100}]), ([CID_A, CID_B, None], [None, {"pid": 7}]),
             ([None], [{"pid": 7, "exe": "/bin/sh"}, {"pid": 100, "exe": None}])]
    for containers, procs in cases:
        known = [c in meta.containers for c in containers if c]
        exes = [bool((meta.process("h1", p) or {}).get("exe")) for p in procs if p]
        assert meta.signature("h1", containers, procs) == json.dumps([known, exes])


def _by_ipaddress(ip: str) -> tuple[str, str | None]:
    """normalize_ip and network as ``ipaddress`` alone says them."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip, None
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    net = None if addr.is_loopback or addr.is_unspecified else str(
        ipaddress.ip_network(f"{ip}/{24 if addr.version == 4 else 64}", strict=False))
    return str(mapped if mapped is not None else addr), net


DOTTED = st.lists(st.text("0123456789", max_size=4), min_size=1, max_size=5).map(".".join)


@given(st.one_of(st.ip_addresses().map(str), DOTTED, st.text("0123456789.:abcdef%x \n", max_size=24),
                 st.sampled_from(["127.0.0.1", "127.255.1.2", "0.0.0.0", "01.2.3.4", "1.2.3.04",
                                  "256.1.1.1", "1.2.3.4\n", " 1.2.3.4", "\u0661.2.3.4", "1.2.3",
                                  "::ffff:10.1.2.3", "::1", "::", "fe80::1%eth0", "1.2.3.4/24"])))
def test_ip_text_is_read_as_ipaddress_reads_it(ip: str) -> None:
    """The IPv4 shortcuts of normalize_ip and network give what ``ipaddress`` gives."""
    assert (normalize_ip(ip), network(ip)) == _by_ipaddress(ip)


class Event:  # Faust's events (the table reads the current one's partition by weak reference)
    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(partition=partition)


class Table(dict[bytes, bytes]):
    """A flows table that notes which keys were read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[bytes] = []

    def get(self, key: bytes, default: Any = None) -> Any:
        self.reads.append(key)
        return super().get(key, default)


def test_flows_not_in_an_indexed_partition_are_not_looked_up() -> None:
    """The flows stage reads a flow from the table unless its partition's index (every flow of
    the partition's table once indexed) says that the table has none."""
    from streams.app import FlowBatch, Worker

    worker = Worker.__new__(Worker)
    worker.flows = Table()  # type: ignore[assignment]
    stored = FlowState.new(obs(1, "client", "START", 0), at(0), 1)
    worker.flows[b"known"] = orjson.dumps(stored.to_dict())
    worker.indexed, worker.due = {1}, {1: {b"known": (0, 0)}}
    event = Event(1)
    batch = FlowBatch()
    assert worker._load(event, b"new", batch).state is None
    assert worker._load(event, b"known", batch).state == stored
    assert worker.flows.reads == [b"known"]  # type: ignore[attr-defined]
    other = Event(2)  # not indexed yet
    assert worker._load(other, b"elsewhere", FlowBatch()).state is None
    assert worker.flows.reads == [b"known", b"elsewhere"]  # type: ignore[attr-defined]


def _lateness(when: tuple[int, int], now_ms: int, watermark_ns: int) -> int | None:
    """How many ms a flow is due (negative), as the flows stage orders them; None: not due."""
    ms, ns = when
    if ms > now_ms and ns > watermark_ns:
        return None
    return min(ms - now_ms, (ns - watermark_ns) // 1_000_000)


TIMES = st.one_of(st.just(NEVER), st.integers(0, 50))  # ms: NEVER or near the clock
KEYS = st.binary(min_size=1, max_size=2)
OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), KEYS, TIMES, st.integers(0, 50), st.sampled_from([0, 123_456])),
    st.tuples(st.just("del"), KEYS),
    st.tuples(st.just("ready"), st.integers(0, 50), st.integers(0, 50), st.integers(1, 8))),
    max_size=200)


@given(OPS)
def test_due_index_finds_the_flows_due_the_longest_first(ops: list[tuple[Any, ...]]) -> None:
    """Against a plain dict read whole: the index gives every flow due by the processing time
    or the watermark, none other, at most ``limit``, in the order of how long they are due
    (whole ms; ties in any order); its heaps stay within twice its size."""
    index, truth = DueIndex(), {}
    for op in ops:
        if op[0] == "set":
            _, key, ms, ns_ms, extra_ns = op  # ns on a whole ms (as the watermark) or not
            index[key] = truth[key] = (ms, ns_ms * 1_000_000 + extra_ns)
        elif op[0] == "del":
            assert index.pop(op[1], None) == truth.pop(op[1], None)
        else:
            _, now_ms, watermark_ms, limit = op
            watermark_ns = watermark_ms * 1_000_000
            late = {key: lateness for key, when in truth.items()
                    if (lateness := _lateness(when, now_ms, watermark_ns)) is not None}
            got = index.ready(now_ms, watermark_ns, limit)
            assert len(got) == len(set(got)) == min(limit, len(late))
            assert set(got) <= late.keys()
            got_late = [late[key] for key in got]
            assert got_late == sorted(late.values())[:len(got)]
            assert dict(index) == truth
        assert all(len(heap) <= 2 * len(truth) + DueIndex.SLACK for heap in index.heaps)


def test_due_index_heaps_stay_bounded_when_times_change() -> None:
    """A flow whose due time changes on every batch leaves stale heap entries; they are dropped
    once they outnumber the live ones, and the flow is due at its latest time only."""
    index = DueIndex()
    for key in range(100):
        index[b"%d" % key] = (NEVER, 10**12)
    for step in range(100_000):
        index[b"0"] = (1000 + step, 10**12 + step)
    assert all(len(heap) <= 2 * len(index) + DueIndex.SLACK for heap in index.heaps)
    assert index.ready(1000 + 99_998, 0, 10) == []
    assert index.ready(1000 + 99_999, 0, 10) == [b"0"]
    assert index.ready(1000 + 99_999, 0, 10) == [b"0"]  # still due until set again


def test_flows_tick_loads_the_due_flows_longest_due_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tick of the flows stage loads the flows due by the processing time or by the
    watermark, the longest due first, at most ``FLOW_BATCH``; an ended flow that only lingers
    is deleted unread; the others stay. A partition not indexed yet is indexed from its table
    (all due), and its flows that lack metadata are due again when some of what they lack came
    (all of them when more changed than the cache remembers)."""
    import streams.app
    from streams.app import FlowBatch, Worker

    now_ms, watermark_ns = 10_000_000, 20_000_000_000_000
    wm_ms = watermark_ns // 1_000_000
    times = {b"active": (now_ms - 5, NEVER - 1),  # due by processing time for 5 ms
             b"idle": (NEVER, (wm_ms - 30) * 1_000_000),  # by the watermark, 30 ms
             b"both": (now_ms - 1, (wm_ms - 10) * 1_000_000 + 1),  # 10 ms (the longer)
             b"ended": (NEVER, (wm_ms - 20) * 1_000_000),  # lingers, 20 ms
             b"later": (now_ms + 1, watermark_ns + 1)}  # not due yet

    def worker_with(table: Table, indexed: bool) -> Worker:
        worker = Worker.__new__(Worker)
        worker.flows = table  # type: ignore[assignment]
        worker.meta, worker.meta_seen = MetaCache(), {1: 0}
        worker.watermarks, worker.awaiting = {1: watermark_ns}, {1: Awaiting()}
        worker.local, worker.raw = LocalAddresses(), raw_stage()[0]
        worker.lingering = {1: {b"ended"}}
        worker.indexed = {1} if indexed else set()
        worker.due = defaultdict(DueIndex)
        if indexed:
            for key, when in times.items():
                worker.due[1][key] = when
        return worker

    table = Table()
    for n, key in enumerate(times):
        state = FlowState.new(obs(n + 1, "client", "START", 0), at(0), 1)
        table[key] = orjson.dumps(state.to_dict())
    worker, batch, event = worker_with(table, True), FlowBatch(), Event(1)
    worker.flows_tick(event, now_ms, batch)
    assert list(batch.flows) == [b"idle", b"both", b"active"]
    assert batch.writes == [(event, b"ended", None)] and batch.size == 4
    assert set(worker.due[1]) == {b"idle", b"both", b"active", b"later"}
    assert table.reads == [b"idle", b"both", b"active"]

    limited = FlowBatch()
    monkeypatch.setattr(streams.app, "FLOW_BATCH", 2)
    worker_with(table, True).flows_tick(event, now_ms, limited)
    monkeypatch.undo()
    assert list(limited.flows) == [b"idle"] and limited.writes == [(event, b"ended", None)]

    fresh = worker_with(table, False)
    fresh.lingering = {}  # as after a rebalance
    reindexed = FlowBatch()
    fresh.flows_tick(event, now_ms, reindexed)  # every flow of the table is due once indexed
    assert sorted(reindexed.flows) == sorted(times) and fresh.indexed == {1}
    fresh.due[1][b"later"] = times[b"later"]
    fresh.due[1][b"waits"] = times[b"later"]
    fresh.awaiting[1].wait(b"later", {"c1", ("h1", 42)})
    fresh.awaiting[1].wait(b"waits", {("h1", 43)})
    fresh.flows_tick(event, now_ms, again := FlowBatch())
    assert not {b"later", b"waits"} & set(again.flows)  # the metadata did not change
    fresh.meta.add_container(None, {"id": "c2", "timestamp_ms": 1})
    fresh.flows_tick(event, now_ms, again)
    assert not {b"later", b"waits"} & set(again.flows)  # not what they lack
    fresh.meta.add_process({"host_name": "h1", "process": {"pid": 42, "exe": "/bin/nc"}})
    fresh.flows_tick(event, now_ms, again)
    assert b"later" in again.flows and b"waits" not in again.flows
    fresh.meta.add_container(None, {"id": "c2", "timestamp_ms": 2})
    fresh.meta.changes.clear()  # as when more changed than it remembers
    fresh.flows_tick(event, now_ms, again)
    assert b"waits" in again.flows


def test_netlink_sockets_first_seen_closed_make_one_flow() -> None:
    """Sockets whose only Netlink record is their SOCKET_CLOSED (idle at the sensor's first
    snapshot, closed before their turn): one flow, START and END, with their last values."""
    closed = [replace(o, source="netlink", kind="SOCKET_CLOSED", state="ESTABLISHED")
              for o in loopback_flow() if o.closed]
    state = None
    for o in closed:
        state, _, _ = observe(state, o, at(0))
    assert state is not None
    emitted = due(state, at(0), CFG, peer_may_come=False)
    assert [e.type for e in emitted] == ["START", "END"]
    rec = flow_record(state, emitted[-1], MetaCache(), 0)
    assert (rec["client_bytes"], rec["server_bytes"]) == (600, 30000)
    assert rec["client"]["process"]["comm"] == "curl" and rec["server"]["process"]["comm"] == "nginx"


def raw_stage(partitions: int = 2) -> tuple[Any, list[tuple[bytes, int, Any]]]:
    """A raw stage (``streams.app.RawStage``) without Kafka, and the (key, flows partition,
    value) of what it sends to the internal sockets topic."""
    from streams.app import RawStage

    raw, sent = RawStage.__new__(RawStage), []
    raw.partitions, raw.local, raw.learnt = partitions, {}, queue.SimpleQueue()
    raw.local_sent = time.monotonic()
    raw.outputs = SimpleNamespace(send=lambda suffix, key, data, partition: sent.append(
        (key, partition, orjson.loads(data))))
    return raw, sent


def flows_stage(publish: Any) -> Any:
    """A flows stage (``streams.app.Worker``) without Kafka, all its flows in partition 1,
    that gives each flow record it publishes to ``publish``."""
    from streams.app import StreamOptions, Worker

    worker = Worker.__new__(Worker)
    worker.flows = Table()  # type: ignore[assignment]
    worker.meta, worker.local = MetaCache(), LocalAddresses()
    worker.options = StreamOptions(flow=CFG)
    worker.indexed, worker.due = {1}, defaultdict(DueIndex)
    worker.awaiting, worker.lingering, worker.meta_seen = {}, {}, {1: 0}
    worker.raw = raw_stage()[0]
    worker.publish_flow = lambda state, emission, now: publish(  # type: ignore[method-assign]
        flow_record(state, emission, worker.meta, now))
    return worker


def stage_batch(worker: Any, now_ms: int, watermark_ns: int, *observations: Observation) -> Any:
    """One batch of the flows stage: the observations, then a tick at ``watermark_ns``; the
    table written. Returns the batch."""
    from streams.app import FlowBatch, _write

    event, batch = Event(1), FlowBatch()
    worker.watermarks = {1: watermark_ns}
    for o in observations:
        worker.flow_event(event, o, now_ms, batch)
    worker.flows_tick(event, now_ms, batch)
    worker.settle(batch, now_ms)
    _write(worker.flows, batch.writes)
    return batch


def test_peer_in_a_network_not_yet_known_local_is_waited_for() -> None:
    """The flows stage reads a server's socket before the raw stage has read any socket of its
    client's network (the client's socket is in another raw partition, read in a later batch):
    the client may still be a local socket, so the flow STARTs once, with both ends, when the
    client's socket (and its address) come, the watermark unchanged (seen with the synthetic
    flows of ``bench.pipeline`` produced while the worker ingests: a START of the server alone,
    then an UPDATE with both ends). A peer still unknown when the watermark has passed the
    flow's time is elsewhere: START and END go without the join delay and END grace."""
    published: list[tuple[str, str, bool, bool]] = []
    worker = flows_stage(lambda rec: published.append((rec["client"]["ip"], rec["type"],
                                                       rec["client"]["local"],
                                                       rec["server"]["local"])))
    now_ms, watermark_ns = T0 // 1_000_000, T0  # caught up; the sockets' events are older

    def batch_of(*observations: Observation) -> None:
        stage_batch(worker, now_ms, watermark_ns, *observations)

    def socket(cookie: int, role: str, client_ip: str, kind: str = "START") -> Observation:
        client = role == "client"
        ends = [(client_ip, 50176), ("10.255.0.1", 8000)]
        (lip, lport), (rip, rport) = ends if client else ends[::-1]
        return replace(obs(cookie, role, kind, -60_000, state="CLOSE" if kind == "END"
                           else "ESTABLISHED"), local_ip=lip, local_port=lport, remote_ip=rip,
                       remote_port=rport)

    worker.local.add("h1", "10.255.0.1")  # the server's network is known, not its clients'
    batch_of(socket(2, "server", "10.0.68.0"), socket(4, "server", "192.0.2.7"))
    assert published == []
    worker.local.add("h1", "10.0.68.0")  # the raw stage's next batch: the client's address
    batch_of(socket(1, "client", "10.0.68.0"))
    assert published == [("10.0.68.0", "START", True, True)]

    published.clear()
    for step in (1, 2):  # the next watermarks, 250 ms each, well within the join delay
        watermark_ns += 250_000_000
        now_ms += 250
        batch_of()
        if step == 1:
            batch_of(socket(4, "server", "192.0.2.7", "END"))
    assert published == [("192.0.2.7", "START", False, True), ("192.0.2.7", "END", False, True)]

    published.clear()
    now_ms += round(CFG.active_timeout_s * 1000)  # nothing changed after the START: no UPDATE
    watermark_ns += round(CFG.end_grace_s * 1e9)
    batch_of()
    assert published == []


def test_flow_lacking_metadata_is_updated_when_it_comes_and_only_then() -> None:
    """Two live flows lack their processes' details (the sensor knew only pid and comm); the
    record of one process comes: only that flow is loaded again, and it gets an UPDATE that
    names the executable. The other is not loaded (a change of metadata used to revisit every
    flow that lacked any)."""
    published: list[tuple[int, str, str | None]] = []
    worker = flows_stage(lambda rec: published.append((rec["client"]["port"], rec["type"],
                                                       rec["client"]["process"].get("exe"))))
    worker.meta.add_container(None, {"id": CID_A, "timestamp_ms": 1})
    worker.meta.add_container(None, {"id": CID_B, "timestamp_ms": 1})
    now_ms, watermark_ns = T0 // 1_000_000, T0

    def both_ends(port: int, client_pid: int) -> list[Observation]:
        return [replace(obs(10 * port + 1, "client", "START", 0), local_port=port,
                        process={"pid": client_pid, "comm": "curl", "args": []}),
                replace(obs(10 * port + 2, "server", "START", 0), remote_port=port)]

    stage_batch(worker, now_ms, watermark_ns, *both_ends(40001, 101), *both_ends(40002, 102))
    assert sorted(published) == [(40001, "START", None), (40002, "START", None)]
    published.clear()
    worker.flows.reads.clear()
    stage_batch(worker, now_ms + 100, watermark_ns)
    assert published == [] and worker.flows.reads == []  # nothing new: nothing loaded

    worker.meta.add_process({"host_name": "h1", "process": {"pid": 101, "comm": "curl",
                                                            "exe": "/usr/bin/curl"}})
    batch = stage_batch(worker, now_ms + 200, watermark_ns)
    assert published == [(40001, "UPDATE", "/usr/bin/curl")]
    assert len(batch.flows) == 1


def test_a_restarted_worker_knows_the_networks_of_its_flows_again() -> None:
    """A worker that restarts reads its flows back from the table: the networks of their
    sockets are local again at once, in this worker and, through its raw stage, in every flows
    partition, before any socket is read again (the raw stage knew only what it read)."""
    from streams.app import FlowBatch

    table = Table()
    for n, (cip, sip) in enumerate([("10.1.2.3", "10.9.9.9"), ("fd00:1::5", "2001:db8::1")]):
        client = replace(obs(n, "client", "START", 0), local_ip=cip, remote_ip=sip)
        state, _, _ = observe(None, client, at(0), 1)
        table[f"flow{n}".encode()] = orjson.dumps(state.to_dict())
    worker = flows_stage(lambda rec: None)
    worker.flows, worker.indexed, worker.watermarks = table, set(), {1: T0}
    worker.raw, sent = raw_stage(partitions=3)
    assert not worker.local.may_be_local("h1", "10.1.2.200")
    worker.flows_tick(Event(1), T0 // 1_000_000, FlowBatch())
    assert worker.local.may_be_local("h1", "10.1.2.200")
    assert worker.local.may_be_local("h1", "fd00:1::77")
    assert not worker.local.may_be_local("h1", "10.9.9.1")  # a peer's network: not local
    worker.raw.share_local(0)
    assert {p for _k, p, _v in sent} == {0, 1, 2}
    assert {(h, network(ip)) for _k, _p, v in sent for h, ip in v} == {
        ("h1", "10.1.2.0/24"), ("h1", network("fd00:1::5"))}


def test_process_records_share_their_equal_strings() -> None:
    """The process cache holds up to ``MAX_PROCESSES`` records, which repeat users, executables,
    cgroups and command lines: equal strings are held once, and the records read the same."""
    meta = MetaCache()
    for pid in (1, 2):
        def made(*parts: str) -> str:
            return "".join(parts)  # a new string each time, as a decoder makes them

        proc = {"pid": pid, "comm": "sh", "user_name": made("ali", "ce"), "exe": made("/bin/", "dash"),
                "args": ["/bin/sh", "-c", made("curl http://localhost:8080/", "healthz")], "ppid": None}
        meta.add_process({"host_name": "h1", "process": proc})
    one, two = meta.processes[("h1", 1)], meta.processes[("h1", 2)]
    assert one["user_name"] is two["user_name"] and one["exe"] is two["exe"]
    assert one["args"][2] is two["args"][2]
    assert two == {"pid": 2, "comm": "sh", "user_name": "alice", "exe": "/bin/dash",
                   "args": ["/bin/sh", "-c", "curl http://localhost:8080/healthz"], "ppid": None}


def test_quiet_entities_leave_the_views_and_their_series_leave_metrics() -> None:
    """An entity without a window for ``VIEW_KEEP_MS`` leaves /containers or /pods, and the
    series of a container no longer listed leave /metrics (a host running many short-lived
    containers would list and export every one ever seen); a name still used by a listed
    container (one recreated under its name) keeps its series."""
    from streams.app import VIEW_KEEP_MS, Metrics, Worker

    now = T0 // 1_000_000
    worker = Worker.__new__(Worker)
    worker.metrics, worker.latest = Metrics(), {}

    def window(entity_type: str, entity_id: str, name: str, end_ms: int) -> None:
        stats = {**schemas.defaults("RttStats"), "p50_us": 100, "p95_us": 200, "p99_us": 300}
        rec = {**schemas.defaults("ContainerMetrics"), "entity_type": entity_type,
               "entity_id": entity_id, "name": name, "window_end_ms": end_ms, "bytes_in": 10,
               "bytes_out": 20, "rtt_as_client": stats, "rtt_as_server": stats}
        worker.latest.setdefault((entity_type, entity_id), {})["tumbling"] = rec
        if entity_type == "CONTAINER":
            worker.metrics.observe_window(rec)

    old = now - VIEW_KEEP_MS - 1
    window("CONTAINER", "a" * 64, "gone", old)
    window("CONTAINER", "b" * 64, "web", old)  # the container "web" was recreated:
    window("CONTAINER", "c" * 64, "web", now)
    window("CONTAINER", "d" * 64, "db", now - VIEW_KEEP_MS + 1000)
    window("POD", "default/old", "old", old)
    window("POD", "default/new", "new", now)
    worker.forget_quiet(now)
    assert [c["id"] for c in worker._entities("CONTAINER")] == ["d" * 64, "c" * 64]
    assert [p["id"] for p in worker._entities("POD")] == ["default/new"]

    def series(name: str) -> float | None:
        return worker.metrics.registry.get_sample_value(
            "packetless_container_bytes_total", {"container": name, "direction": "in"})

    assert series("gone") is None and series("web") == 20 and series("db") == 10
    assert worker.metrics.registry.get_sample_value("packetless_container_rtt_seconds", {
        "container": "gone", "quantile": "0.99", "role": "client"}) is None


def test_removed_containers_are_forgotten_an_hour_after_their_removal() -> None:
    """A removed container (its REMOVED record, or a tombstone) is kept for its flows' last
    events, then forgotten; running ones stay. A tombstone changes nothing at once: no flow
    is revisited for it."""
    from packetless.topics import REMOVED_CONTAINER_KEEP_MS as REMOVED_KEEP_MS

    meta = MetaCache()
    now = T0 // 1_000_000

    def container(cid: str, state: str, at_ms: int) -> None:
        meta.add_container(cid, {"id": cid, "state": state, "timestamp_ms": at_ms})

    container("old", "RUNNING", now - 2 * REMOVED_KEEP_MS)
    container("old", "REMOVED", now - REMOVED_KEEP_MS - 1)
    container("recent", "REMOVED", now - 1000)
    container("running", "RUNNING", now - 3 * REMOVED_KEEP_MS)
    container("dropped", "STOPPED", now - 3 * REMOVED_KEEP_MS)
    version = meta.version
    meta.add_container("recent", None, now)  # behind its REMOVED record: still the same time
    meta.add_container("dropped", None, now - 10)  # its REMOVED record was compacted away
    meta.add_container("unknown", None, now)
    assert meta.version == version and "dropped" in meta.containers
    meta.expire(now)
    assert sorted(meta.containers) == ["dropped", "recent", "running"]
    meta.expire(now + REMOVED_KEEP_MS)
    assert sorted(meta.containers) == ["running"] and meta.removed == {}


def test_listeners_not_seen_for_a_while_are_forgotten() -> None:
    """A listening port makes the Netlink sockets on it servers; one that no snapshot showed
    for ``LISTENER_KEEP_S`` (its container and network namespace gone) is forgotten, and one
    seen again stays."""
    from streams.raw import LISTENER_KEEP_S

    listeners = Listeners()
    listeners.add("h1", 1, 80, now=0.0)
    listeners.add("h1", 2, 443, now=100.0)
    listeners.add("h1", 1, 80, now=200.0)  # shown again by a later snapshot
    listeners.add("h1", 3, 8080, now=LISTENER_KEEP_S + 150.0)
    assert listeners.role("h1", 1, 80) == "server" and listeners.role("h1", 3, 8080) == "server"
    assert listeners.role("h1", 2, 443) is None and len(listeners.ports) == 2
