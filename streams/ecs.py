"""Elastic Common Schema documents of a flow event (topic packetless.flows.ecs): one document per
local socket of the flow, ``source`` the initiator and ``destination`` the responder (SPEC.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

ACTIONS = {"START": "flow_start", "UPDATE": "flow_update", "END": "flow_end"}
EVENT_TYPES = {"flow_start": ["connection", "start"], "flow_update": ["connection", "info"],
               "flow_end": ["connection", "end"], "connection_failed": ["connection", "error"]}


def iso(ns: int) -> str:
    """Epoch nanoseconds as an ISO 8601 UTC timestamp with microseconds."""
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def action(flow: dict[str, Any]) -> str:
    if flow["type"] == "END" and flow["end_reason"] == "failed":
        return "connection_failed"
    return ACTIONS[flow["type"]]


def drop_empty(value: Any) -> Any:
    """``value`` without None values and empty objects (ECS: fields appear when known)."""
    if isinstance(value, dict):
        cleaned = {k: drop_empty(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v is not None and v != {}}
    return value


def process_fields(proc: dict[str, Any] | None) -> dict[str, Any] | None:
    """ECS ``process.*`` of a ``packetless.Process`` record."""
    if not proc:
        return None
    args = proc.get("args") or []
    name = proc.get("comm") or (proc.get("exe") or "").rsplit("/", 1)[-1] or None
    uid = proc.get("uid")
    return {
        "pid": proc["pid"], "name": name, "executable": proc.get("exe"),
        "args": args or None, "args_count": len(args) or None,
        "command_line": " ".join(args) or None,
        "start": iso(proc["start_time_ms"] * 1_000_000) if proc.get("start_time_ms") else None,
        "parent": {"pid": proc.get("ppid"), "name": proc.get("parent_name")},
        "user": {"id": str(uid) if uid is not None else None, "name": proc.get("user_name")},
        "group": {"id": str(proc["gid"]) if proc.get("gid") is not None else None,
                  "name": proc.get("group_name")},
        "thread": {"id": proc.get("tid")},
    }


def container_fields(ref: dict[str, Any] | None) -> dict[str, Any] | None:
    """ECS ``container.*`` of a ``packetless.ContainerRef``."""
    if not ref:
        return None
    return {"id": ref["id"], "name": ref.get("name"), "image": {"name": ref.get("image")},
            "runtime": ref.get("runtime"), "labels": ref.get("labels") or None}


def orchestrator_fields(ref: dict[str, Any] | None) -> dict[str, Any] | None:
    if not ref or not ref.get("pod_name"):
        return None
    return {"type": "kubernetes", "namespace": ref.get("pod_namespace"),
            "resource": {"type": "pod", "name": ref["pod_name"], "id": ref.get("pod_uid")}}


def documents(flow: dict[str, Any]) -> list[dict[str, Any]]:
    """The ECS documents of a ``packetless.Flow`` record, one per local end."""
    return [document(flow, side) for side in ("client", "server") if flow[side]["local"]]


def document(flow: dict[str, Any], side: str) -> dict[str, Any]:
    """The ECS document of ``flow`` seen from its local ``side`` (client or server)."""
    me = flow[side]
    peer = flow["server" if side == "client" else "client"]
    client, server = flow["client"], flow["server"]
    act = action(flow)
    start_ns = flow["start_ns"]
    last_ns = flow["end_ns"] or max(flow["timestamp_ms"] * 1_000_000, start_ns)
    proc = process_fields(me["process"])
    doc: dict[str, Any] = {
        "@timestamp": iso(flow["timestamp_ms"] * 1_000_000),
        "ecs": {"version": "8.11.0"},
        "event": {
            "kind": "event", "category": ["network"], "type": EVENT_TYPES[act], "action": act,
            "outcome": "failure" if act == "connection_failed" else "success",
            "id": f"{flow['flow_id']}-{flow['sequence']}-{me['socket_cookie']}",
            "dataset": "packetless.flows", "module": "packetless",
            "start": iso(start_ns), "end": iso(flow["end_ns"]) if flow["end_ns"] else None,
            "duration": max(last_ns - start_ns, 0),
            "created": iso(flow["emitted_ms"] * 1_000_000),
            "reason": flow["error"],
        },
        "network": {
            "transport": flow["transport"], "type": flow["family"],
            "iana_number": str(flow["iana_number"]),
            "direction": "egress" if side == "client" else "ingress",
            "community_id": flow["community_id"],
            "bytes": flow["client_bytes"] + flow["server_bytes"],
            "packets": flow["client_packets"] + flow["server_packets"],
        },
        "source": {"ip": client["ip"], "port": client["port"], "bytes": flow["client_bytes"],
                   "packets": flow["client_packets"]},
        "destination": {"ip": server["ip"], "port": server["port"], "bytes": flow["server_bytes"],
                        "packets": flow["server_packets"]},
        "process": proc and {k: v for k, v in proc.items() if k != "group"},
        "user": proc and proc["user"],
        "group": proc and proc["group"],
        "container": container_fields(me["container"]),
        "orchestrator": orchestrator_fields(me["container"]),
        "host": {"name": flow["host_name"]},
        "related": {"ip": sorted({client["ip"], server["ip"]})},
        "packetless": {
            "flow_id": flow["flow_id"], "flow_event": flow["type"], "sequence": flow["sequence"],
            "end_reason": flow["end_reason"], "socket_cookie": me["socket_cookie"],
            "netns_inode": me["netns_inode"],
            "tcp": {"rtt_us": me["srtt_us"], "rtt_var_us": me["rttvar_us"],
                    "retransmits": me["retransmits"], "state": me["tcp_state"]}
            if flow["transport"] == "tcp" else None,
            "peer": {"process": process_fields(peer["process"]),
                     "container": container_fields(peer["container"]),
                     "socket_cookie": peer["socket_cookie"]} if peer["local"] else None,
        },
    }
    return drop_empty(doc)
