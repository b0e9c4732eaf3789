// Packetless eBPF sensor: every TCP and UDP socket flow with its process and cgroup, counted
// in the kernel. Only stable interfaces: cgroup sock/sock_ops/skb contexts (UAPI), tracepoint
// records, and wire headers; no kprobes and no kernel struct layouts. Compiled by bcc.
//
// Joins: a socket is named by its cookie. Socket-creating processes are recorded at
// INET_SOCK_CREATE; accepted sockets (which never pass there) are attributed to the first
// process that sends or receives on them (sock:sock_{send,recv}_length run in that process),
// joined from the tracepoint's sk pointer to the cookie through sk_cookie, which holds the
// socket's address as an opaque key (stored where a program has both; never dereferenced;
// dropped at the release of the socket or, for TCP, at the CLOSE of its flow).
// Once a TCP socket's owner is known, its I/O costs one lookup there (and a sum for reads).
// Owners carry the cookie of the socket's network namespace (bpf_get_netns_cookie), which user
// space maps to the namespace's inode (sensor/netns.py) even after the process is gone.
//
// TCP byte counts are the kernel's own (sock_ops bytes_acked / bytes_received) minus what is
// sequence space but not payload: the SYN (a baseline taken at ESTABLISHED) and a FIN (ours
// once acknowledged; the peer's once rcv_nxt passed it: the ingress cgroup_skb program, which
// reads only the headers of TCP packets, in place, notes where a FIN ends). They are read at
// sock_ops callbacks (state changes, RTT samples); a socket that only receives gets no RTT
// samples, so the bytes its application read (sk_info.rx) show its progress in UPDATEs.
// UDP bytes are datagram payloads counted by cgroup_skb per (socket, remote address, port).

#define AF_INET 2
#define AF_INET6 10
#define PROTO_TCP 6
#define PROTO_UDP 17
#define MSG_PEEK 2

// event types (mirrored in sensor/ebpf.py)
#define EV_START 1
#define EV_END 2
#define EV_STATE 3
#define EV_FAILURE 4
#define EV_RELEASE 5

// roles
#define ROLE_UNKNOWN 0
#define ROLE_CLIENT 1
#define ROLE_SERVER 2

// owner sources
#define SRC_CREATOR 1
#define SRC_FIRST_IO 2
#define SRC_LISTENER 3

// flow flags
#define F_ESTABLISHED 1
#define F_FIN_IN 2
#define F_FIN_OUT 4
#define F_RST_IN 8
#define F_FIN_ACKED 16
#define F_RELEASED 32
#define F_TIMEOUT 64
#define F_STARTED 128

// drop counters (index into `drops`)
#define D_RINGBUF 0
#define D_TCP_MAP 1
#define D_UDP_MAP 2
#define D_OWNER_MAP 3
#define D_SK_MAP 4
#define D_MAX 5

// config flags (index 0 of `config`)
#define C_STATE_EVENTS 1

struct owner_t {
    u64 cgroup_id;
    u32 pid;
    u32 tid;
    u32 uid;
    u32 gid;
    char comm[16];
    u8 source;
    u8 pad[7];
    u64 netns;  // cookie of the socket's network namespace (0: unknown)
};

struct tcp_flow_t {
    u64 start_ns;
    u64 acked0;
    u64 rcvd0;
    u64 bytes_acked;
    u64 bytes_received;
    u32 segs_in;
    u32 segs_out;
    u32 srtt_us;
    u32 rttvar_us;
    u32 retrans;
    u32 laddr[4];
    u32 raddr[4];
    u32 fin_end;  // the peer's FIN: rcv_nxt once it is counted in bytes_received
    u16 lport;
    u16 rport;
    u16 family;
    u8 role;
    u8 flags;
    u8 fin_seen;
    u8 pad[7];
};

struct sk_info_t {
    u64 cookie;
    u64 netns;  // cookie of its network namespace
    u64 rx;  // bytes the application read (TCP)
    u32 owned;  // TCP: its owner is known
    u32 protocol;  // PROTO_TCP or PROTO_UDP
};

struct udp_key_t {
    u64 cookie;
    u32 raddr[4];
    u16 rport;
    u16 family;
    u32 pad;
};

struct udp_flow_t {
    u64 start_ns;
    u64 last_ns;
    u64 tx_bytes;
    u64 rx_bytes;
    u64 tx_pkts;
    u64 rx_pkts;
    u32 laddr[4];
    u16 lport;
    u8 role;
    u8 pad[5];
};

struct event_t {
    u64 ts_ns;
    u64 cookie;
    u64 start_ns;
    u64 bytes_sent;
    u64 bytes_received;
    u64 pkts_sent;
    u64 pkts_received;
    u32 srtt_us;
    u32 rttvar_us;
    u32 retrans;
    u32 laddr[4];
    u32 raddr[4];
    u16 lport;
    u16 rport;
    u16 family;
    u8 type;
    u8 proto;
    u8 role;
    u8 state;
    u8 oldstate;
    u8 flags;
    struct owner_t owner;
};

// Plain hash maps rather than LRU ones: a full map is counted in `drops` instead of silently
// evicting a live flow. Every entry has an end: TCP flows at CLOSE, owners and sk_cookie at
// INET_SOCK_RELEASE (or CLOSE, whichever comes last), UDP flows by user space (idle, release).
// Events to user space are per flow (start/end), never per packet.
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(owners, u64, struct owner_t, OWNER_ENTRIES);
BPF_HASH(sk_cookie, u64, struct sk_info_t, OWNER_ENTRIES);
BPF_TABLE("lru_hash", u16, struct owner_t, listeners, 4096);
BPF_HASH(tcp_flows, u64, struct tcp_flow_t, TCP_ENTRIES);
BPF_HASH(udp_flows, struct udp_key_t, struct udp_flow_t, UDP_ENTRIES);
BPF_PERCPU_ARRAY(drops, u64, D_MAX);
BPF_ARRAY(config, u64, 1);

// Map writes get a second try before a loss is counted: a write can fail for a passing reason
// (a bucket lock that timed out while its holder's CPU was preempted, as in a busy VM).
static __always_inline void count_drop(int what)
{
    u64 *n = drops.lookup(&what);
    if (n)
        (*n)++;
}

static __always_inline void fill_owner(struct owner_t *o, u8 source, u64 netns)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 uid_gid = bpf_get_current_uid_gid();
    o->pid = pid_tgid >> 32;
    o->tid = (u32)pid_tgid;
    o->uid = (u32)uid_gid;
    o->gid = uid_gid >> 32;
    o->cgroup_id = bpf_get_current_cgroup_id();
    o->source = source;
    o->netns = netns;
    bpf_get_current_comm(&o->comm, sizeof(o->comm));
}

static __always_inline int put_owner(u64 cookie, struct owner_t *o)
{
    if (owners.update(&cookie, o) && owners.update(&cookie, o)) {
        count_drop(D_OWNER_MAP);
        return -1;
    }
    return 0;
}

static __always_inline void put_sk(u64 skaddr, u64 cookie, u64 netns, u32 protocol)
{
    struct sk_info_t info = {.cookie = cookie, .netns = netns, .protocol = protocol};
    if (sk_cookie.update(&skaddr, &info) && sk_cookie.update(&skaddr, &info))
        count_drop(D_SK_MAP);
}

static __always_inline struct event_t *new_event(u8 type, u64 cookie)
{
    struct event_t *ev = events.ringbuf_reserve(sizeof(struct event_t));
    if (!ev) {
        count_drop(D_RINGBUF);
        return 0;
    }
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->type = type;
    ev->cookie = cookie;
    ev->ts_ns = bpf_ktime_get_boot_ns();
    return ev;
}

static __always_inline void copy_owner(struct event_t *ev, u64 cookie)
{
    struct owner_t *o = owners.lookup(&cookie);
    if (!o && ev->role == ROLE_SERVER) {
        u16 port = ev->lport;
        o = listeners.lookup(&port);  // accepted, then closed before any I/O
    }
    if (o)
        __builtin_memcpy(&ev->owner, o, sizeof(*o));
}

// ---- sockets created by a process: INET_SOCK_CREATE runs in its context --------------------

int sock_create(struct bpf_sock *sk)
{
    if (sk->protocol != PROTO_TCP && sk->protocol != PROTO_UDP)
        return 1;
    u64 cookie = bpf_get_socket_cookie(sk);
    u64 netns = bpf_get_netns_cookie(sk);
    struct owner_t o = {};
    fill_owner(&o, SRC_CREATOR, netns);
    if (put_owner(cookie, &o) == 0)
        put_sk((u64)sk, cookie, netns, sk->protocol);
    return 1;
}

// INET_SOCK_RELEASE: close() of the last reference, in the closing process's context.
int sock_release(struct bpf_sock *sk)
{
    if (sk->protocol != PROTO_TCP && sk->protocol != PROTO_UDP)
        return 1;
    u64 cookie = bpf_get_socket_cookie(sk);
    u64 skaddr = (u64)sk;
    sk_cookie.delete(&skaddr);
    if (sk->protocol == PROTO_UDP) {
        struct event_t *ev = new_event(EV_RELEASE, cookie);
        if (ev) {
            ev->proto = PROTO_UDP;
            copy_owner(ev, cookie);
            events.ringbuf_submit(ev, 0);
        }
        owners.delete(&cookie);
        return 1;
    }
    struct tcp_flow_t *f = tcp_flows.lookup(&cookie);
    if (f)
        f->flags |= F_RELEASED;  // the END still needs the owner
    else
        owners.delete(&cookie);
    return 1;
}

// ---- TCP: sock_ops ----------------------------------------------------------------------

static __always_inline void tcp_addrs(struct bpf_sock_ops *ctx, struct tcp_flow_t *f)
{
    // every context field is read unconditionally: the verifier refuses context pointers the
    // compiler would otherwise compute per branch
    u32 family = ctx->family;
    u32 l4 = ctx->local_ip4, r4 = ctx->remote_ip4;
    u32 l0 = ctx->local_ip6[0], l1 = ctx->local_ip6[1], l2 = ctx->local_ip6[2],
        l3 = ctx->local_ip6[3];
    u32 r0 = ctx->remote_ip6[0], r1 = ctx->remote_ip6[1], r2 = ctx->remote_ip6[2],
        r3 = ctx->remote_ip6[3];
    f->family = family;
    f->lport = ctx->local_port;
    f->rport = bpf_ntohl(ctx->remote_port);  // the port in network order, shifted left 16
    if (family == AF_INET) {
        f->laddr[0] = l4;
        f->raddr[0] = r4;
    } else {
        f->laddr[0] = l0;
        f->laddr[1] = l1;
        f->laddr[2] = l2;
        f->laddr[3] = l3;
        f->raddr[0] = r0;
        f->raddr[1] = r1;
        f->raddr[2] = r2;
        f->raddr[3] = r3;
    }
}

static __always_inline void tcp_snapshot(struct bpf_sock_ops *ctx, struct tcp_flow_t *f)
{
    f->bytes_acked = ctx->bytes_acked;
    f->bytes_received = ctx->bytes_received;
    if (f->fin_seen && ctx->rcv_nxt == f->fin_end)
        f->flags |= F_FIN_IN;
    f->segs_in = ctx->segs_in;
    f->segs_out = ctx->segs_out;
    f->srtt_us = ctx->srtt_us >> 3;
    f->retrans = ctx->total_retrans;
}

// Payload bytes: the kernel counters count sequence space, which includes the FIN (and the
// SYN before the baseline taken at ESTABLISHED). Sent: minus our FIN once acknowledged.
// Received: minus the peer's FIN once seen. (_flow_counters in sensor/ebpf.py does the same.)
static __always_inline void tcp_fill_event(struct event_t *ev, struct tcp_flow_t *f)
{
    ev->proto = PROTO_TCP;
    ev->start_ns = f->start_ns;
    u64 sent = f->bytes_acked - f->acked0;
    u64 rcvd = f->bytes_received - f->rcvd0;
    if (f->flags & F_FIN_ACKED && sent > 0)
        sent--;
    if (f->flags & F_FIN_IN && rcvd > 0)
        rcvd--;
    ev->bytes_sent = sent;
    ev->bytes_received = rcvd;
    ev->pkts_sent = f->segs_out;
    ev->pkts_received = f->segs_in;
    ev->srtt_us = f->srtt_us;
    ev->rttvar_us = f->rttvar_us;
    ev->retrans = f->retrans;
    __builtin_memcpy(ev->laddr, f->laddr, sizeof(f->laddr));
    __builtin_memcpy(ev->raddr, f->raddr, sizeof(f->raddr));
    ev->lport = f->lport;
    ev->rport = f->rport;
    ev->family = f->family;
    ev->role = f->role;
    ev->flags = f->flags;
}

static __always_inline void emit_tcp(u8 type, u64 cookie, struct tcp_flow_t *f, u8 oldstate,
                                     u8 state)
{
    struct event_t *ev = new_event(type, cookie);
    if (!ev)
        return;
    tcp_fill_event(ev, f);
    ev->oldstate = oldstate;
    ev->state = state;
    copy_owner(ev, cookie);
    events.ringbuf_submit(ev, 0);
}

#define CB_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG | \
                  BPF_SOCK_OPS_RETRANS_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG)

static __always_inline void tcp_new_flow(struct bpf_sock_ops *ctx, u64 cookie, u8 role)
{
    struct tcp_flow_t f = {};
    f.start_ns = bpf_ktime_get_boot_ns();
    f.role = role;
    tcp_addrs(ctx, &f);
    if (tcp_flows.update(&cookie, &f) && tcp_flows.update(&cookie, &f)) {
        count_drop(D_TCP_MAP);
        return;
    }
    bpf_sock_ops_cb_flags_set(ctx, CB_FLAGS);
}

int sock_ops(struct bpf_sock_ops *ctx)
{
    u32 op = ctx->op;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct tcp_flow_t *f;

    switch (op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        tcp_new_flow(ctx, cookie, ROLE_CLIENT);
        return 1;
    case BPF_SOCK_OPS_TCP_LISTEN_CB: {
        // listen() runs in the listener's process: remember it per local port, to attribute
        // accepted sockets that are closed before any process reads or writes them.
        struct owner_t o = {};
        fill_owner(&o, SRC_LISTENER, bpf_get_netns_cookie(ctx));
        u16 port = ctx->local_port;
        listeners.update(&port, &o);
        return 1;
    }
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
        tcp_new_flow(ctx, cookie, ROLE_SERVER);
        f = tcp_flows.lookup(&cookie);
        if (!f)
            return 1;
        f->flags |= F_ESTABLISHED;
        tcp_snapshot(ctx, f);
        f->acked0 = f->bytes_acked;
        f->rcvd0 = f->bytes_received;
        struct bpf_sock *sk = ctx->sk;
        if (sk)
            put_sk((u64)sk, cookie, bpf_get_netns_cookie(ctx), PROTO_TCP);
        return 1;  // START is sent at first I/O, when the owning process is known
    }
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        f = tcp_flows.lookup(&cookie);
        if (!f)
            return 1;
        f->flags |= F_ESTABLISHED | F_STARTED;
        tcp_addrs(ctx, f);  // the local address is bound by now
        tcp_snapshot(ctx, f);
        f->acked0 = f->bytes_acked;
        f->rcvd0 = f->bytes_received;
        emit_tcp(EV_START, cookie, f, 0, BPF_TCP_ESTABLISHED);
        return 1;
    case BPF_SOCK_OPS_RTT_CB: {
        f = tcp_flows.lookup(&cookie);
        if (!f)
            return 1;
        // RFC 6298 RTTVAR from the kernel's RTT samples (ctx has no mdev).
        u32 m = ctx->args[0];
        u32 prev = f->srtt_us;
        if (prev == 0) {
            f->rttvar_us = m / 2;
        } else {
            u32 d = prev > m ? prev - m : m - prev;
            f->rttvar_us = (3 * f->rttvar_us + d) / 4;
        }
        tcp_snapshot(ctx, f);
        return 1;
    }
    case BPF_SOCK_OPS_RETRANS_CB:
        f = tcp_flows.lookup(&cookie);
        if (f)
            tcp_snapshot(ctx, f);
        return 1;
    case BPF_SOCK_OPS_RTO_CB:
        f = tcp_flows.lookup(&cookie);
        if (f && ctx->args[2])
            f->flags |= F_TIMEOUT;
        return 1;
    case BPF_SOCK_OPS_STATE_CB: {
        f = tcp_flows.lookup(&cookie);
        if (!f)
            return 1;
        u8 old = ctx->args[0], new = ctx->args[1];
        tcp_snapshot(ctx, f);
        // a FIN we sent counts in bytes_acked once acknowledged (all that was sent is)
        if ((f->flags & F_FIN_OUT) && ctx->snd_una == ctx->snd_nxt)
            f->flags |= F_FIN_ACKED;
        if (new == BPF_TCP_FIN_WAIT1 || new == BPF_TCP_LAST_ACK)
            f->flags |= F_FIN_OUT;  // our FIN is about to be sent
        if (new != BPF_TCP_CLOSE) {
            int zero = 0;
            u64 *cfg = config.lookup(&zero);
            if (cfg && (*cfg & C_STATE_EVENTS))
                emit_tcp(EV_STATE, cookie, f, old, new);
            return 1;
        }
        emit_tcp((f->flags & F_ESTABLISHED) ? EV_END : EV_FAILURE, cookie, f, old, new);
        if (f->flags & F_RELEASED)
            owners.delete(&cookie);
        tcp_flows.delete(&cookie);
        // The flow is over: its address is not looked up again. A connection closed before
        // any process accepted it never passes sock_release, and one that connects again
        // (after connect(AF_UNSPEC)) must not count the reads of the last one.
        struct bpf_sock *sk = ctx->sk;
        if (sk) {
            u64 skaddr = (u64)sk;
            sk_cookie.delete(&skaddr);
        }
        return 1;
    }
    }
    return 1;
}

// RST received: mark the flow (a reset in SYN_SENT is a refused connection).
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 cookie = args->sock_cookie;
    struct tcp_flow_t *f = tcp_flows.lookup(&cookie);
    if (f)
        f->flags |= F_RST_IN;
    return 0;
}

// ---- process-context I/O: attribution of accepted sockets and of older UDP sockets --------
// Raw tracepoints (arguments: struct sock *sk, int ret, int flags): no event record is filled
// for them at each send and receive, which the formatted tracepoints of the same name cost on
// every socket of the host. The socket is looked up by address among those we follow (TCP or
// UDP, with its protocol), so no kernel struct is read.

static __always_inline void sock_io(u64 skaddr, int ret, int flags, int rx)
{
    if (ret < 0)
        return;
    struct sk_info_t *info = sk_cookie.lookup(&skaddr);
    if (!info)
        return;
    u64 cookie = info->cookie;
    struct owner_t o = {};
    if (info->protocol == PROTO_UDP) {
        // a UDP socket created before the sensor started: its first user owns it
        if (!owners.lookup(&cookie)) {
            fill_owner(&o, SRC_FIRST_IO, info->netns);
            put_owner(cookie, &o);
        }
        return;
    }
    if (rx && !(flags & MSG_PEEK))
        __sync_fetch_and_add(&info->rx, ret);
    if (info->owned)
        return;
    struct tcp_flow_t *f = tcp_flows.lookup(&cookie);
    if (!f)
        return;
    info->owned = 1;
    if (f->flags & F_STARTED)
        return;
    f->flags |= F_STARTED;  // an accepted socket: this first I/O names its owner
    fill_owner(&o, SRC_FIRST_IO, info->netns);
    if (put_owner(cookie, &o))
        return;
    emit_tcp(EV_START, cookie, f, 0, BPF_TCP_ESTABLISHED);
}

RAW_TRACEPOINT_PROBE(sock_send_length)
{
    sock_io(ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], 0);
    return 0;
}

RAW_TRACEPOINT_PROBE(sock_recv_length)
{
    sock_io(ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], 1);
    return 0;
}

// ---- packets: TCP FIN seen on ingress, UDP counters per (socket, remote) -------------------

struct pkt_t {
    u32 saddr[4];
    u32 daddr[4];
    u16 sport;
    u16 dport;
    u16 family;
    u8 proto;
    u8 pad;
    u32 l4_payload;
};

static __always_inline int parse(struct __sk_buff *skb, struct pkt_t *p)
{
    u32 l4off;
    u8 b[40];
    if (skb->protocol == bpf_htons(0x0800)) {
        if (bpf_skb_load_bytes(skb, 0, b, 20))
            return -1;
        if ((b[6] & 0x1f) || b[7])  // a fragment other than the first: no L4 header
            return -1;
        l4off = (b[0] & 0x0f) * 4;
        p->proto = b[9];
        p->family = AF_INET;
        __builtin_memcpy(&p->saddr[0], &b[12], 4);
        __builtin_memcpy(&p->daddr[0], &b[16], 4);
    } else if (skb->protocol == bpf_htons(0x86DD)) {
        if (bpf_skb_load_bytes(skb, 0, b, 40))
            return -1;
        l4off = 40;  // extension headers are not followed
        p->proto = b[6];
        p->family = AF_INET6;
        __builtin_memcpy(p->saddr, &b[8], 16);
        __builtin_memcpy(p->daddr, &b[24], 16);
    } else {
        return -1;
    }
    if (p->proto == PROTO_UDP) {
        if (bpf_skb_load_bytes(skb, l4off, b, 8))
            return -1;
        p->sport = (b[0] << 8) | b[1];
        p->dport = (b[2] << 8) | b[3];
        p->l4_payload = skb->len - l4off - 8;
    }
    return 0;
}

// TCP, the bulk of packets, in place (direct packet access to the linear part, which holds
// the headers of locally built or received TCP segments): 1 if the packet was TCP.
static __always_inline int tcp_packet(struct __sk_buff *skb, int egress)
{
    u8 *data = (u8 *)(long)skb->data;
    u8 *end = (u8 *)(long)skb->data_end;
    u32 l4off;
    if (skb->protocol == bpf_htons(0x0800)) {
        if (data + 20 > end || data[9] != PROTO_TCP)
            return 0;
        if ((data[6] & 0x1f) || data[7])  // not a first fragment: no TCP header
            return 1;
        l4off = (data[0] & 0x0f) * 4;
    } else if (skb->protocol == bpf_htons(0x86DD)) {
        if (data + 40 > end || data[6] != PROTO_TCP)
            return 0;
        l4off = 40;
    } else {
        return 0;
    }
    if (egress)
        return 1;
    u8 tcp[14];  // up to the flags
    u8 *at = data + l4off;
    if (at + 14 <= end)
        __builtin_memcpy(tcp, at, 14);
    else if (bpf_skb_load_bytes(skb, l4off, tcp, 14))
        return 1;
    if (!(tcp[13] & 0x01))
        return 1;
    // a FIN from the peer: it ends after the segment's payload (SYN and FIN take one each)
    u32 seq = ((u32)tcp[4] << 24) | ((u32)tcp[5] << 16) | ((u32)tcp[6] << 8) | tcp[7];
    u32 payload = skb->len - l4off - (tcp[12] >> 4) * 4;
    u64 cookie = bpf_get_socket_cookie(skb);
    struct tcp_flow_t *f = tcp_flows.lookup(&cookie);
    if (f) {
        f->fin_end = seq + payload + 1 + ((tcp[13] & 0x02) ? 1 : 0);
        f->fin_seen = 1;
    }
    return 1;
}

// A new UDP flow in the map and its START event; the flow's entry, or 0.
static __always_inline struct udp_flow_t *udp_start(struct udp_key_t *k, struct udp_flow_t *n,
                                                    u64 cookie, u16 family, struct owner_t *o)
{
    if (udp_flows.insert(k, n) == 0) {
        struct event_t *ev = new_event(EV_START, cookie);
        if (ev) {
            ev->proto = PROTO_UDP;
            ev->start_ns = n->start_ns;
            ev->family = family;
            __builtin_memcpy(ev->laddr, n->laddr, sizeof(n->laddr));
            __builtin_memcpy(ev->raddr, k->raddr, sizeof(k->raddr));
            ev->lport = n->lport;
            ev->rport = k->rport;
            ev->role = n->role;
            if (o)
                __builtin_memcpy(&ev->owner, o, sizeof(*o));
            events.ringbuf_submit(ev, 0);
        }
    }
    return udp_flows.lookup(k);
}

static __always_inline int on_packet(struct __sk_buff *skb, int egress)
{
    if (tcp_packet(skb, egress))
        return 1;
    struct pkt_t p = {};
    if (parse(skb, &p) || p.proto != PROTO_UDP)
        return 1;
    u64 cookie = bpf_get_socket_cookie(skb);
    struct owner_t *o = owners.lookup(&cookie);
    if (!o) {
        // created before the sensor started (or by the kernel): let the tracepoints of its
        // first send or receive name its owner
        struct bpf_sock *sk = skb->sk;
        u64 skaddr = (u64)sk;
        if (sk && !sk_cookie.lookup(&skaddr))
            put_sk(skaddr, cookie, bpf_get_netns_cookie(skb), PROTO_UDP);
    }
    struct udp_key_t k = {};
    k.cookie = cookie;
    k.family = p.family;
    __builtin_memcpy(k.raddr, egress ? p.daddr : p.saddr, sizeof(k.raddr));
    k.rport = egress ? p.dport : p.sport;
    u64 now = bpf_ktime_get_boot_ns();
    u32 segs = skb->gso_segs ? skb->gso_segs : 1;
    struct udp_flow_t *f = udp_flows.lookup(&k);
    if (!f) {
        struct udp_flow_t n = {};
        n.start_ns = now;
        __builtin_memcpy(n.laddr, egress ? p.saddr : p.daddr, sizeof(n.laddr));
        n.lport = egress ? p.sport : p.dport;
        n.role = egress ? ROLE_CLIENT : ROLE_SERVER;  // the side that sent first initiated
        f = udp_start(&k, &n, cookie, p.family, o);
        if (!f)
            f = udp_start(&k, &n, cookie, p.family, o);
        if (!f) {
            count_drop(D_UDP_MAP);
            return 1;
        }
    }
    f->last_ns = now;
    if (egress) {
        __sync_fetch_and_add(&f->tx_bytes, p.l4_payload);
        __sync_fetch_and_add(&f->tx_pkts, segs);
    } else {
        __sync_fetch_and_add(&f->rx_bytes, p.l4_payload);
        __sync_fetch_and_add(&f->rx_pkts, segs);
    }
    return 1;
}

int skb_egress(struct __sk_buff *skb)
{
    return on_packet(skb, 1);
}

int skb_ingress(struct __sk_buff *skb)
{
    return on_packet(skb, 0);
}
