// Packetless process lineage: exec and exit of every process from the sched tracepoints, so
// that processes shorter than any /proc scan are seen too. Tracepoint records and helpers
// only (no kernel struct layouts). Compiled by bcc; read by sensor/lineage.py.
//
// The parent of an exec is the process that forked it (sched_process_fork, remembered per
// child pid in an LRU map); the exit of a process is the exit of its thread-group leader.

#define EV_EXEC 1
#define EV_EXIT 2
#define FILENAME_LEN 256

// drop counters (index into `drops`)
#define D_RINGBUF 0
#define D_MAX 1

struct parent_t {
    u32 ppid;   // thread group id of the forking process
    u64 fork_ns; // boot-time clock of the fork
};

struct process_event_t {
    u64 ts_ns;      // bpf_ktime_get_boot_ns() of the event
    u64 fork_ns;    // when the process was forked (0: before the sensor started)
    u64 cgroup_id;
    u32 type;
    u32 pid;        // thread group id
    u32 ppid;       // 0 when unknown
    u32 uid;
    u32 gid;
    char comm[16];
    char filename[FILENAME_LEN];  // EXEC: the executed file
};

BPF_RINGBUF_OUTPUT(process_events, RINGBUF_PAGES);
BPF_TABLE("lru_hash", u32, struct parent_t, parents, PARENT_ENTRIES);
BPF_ARRAY(drops, u64, D_MAX);

static __always_inline void count_drop(int index) {
    u64 *counter = drops.lookup(&index);
    if (counter)
        __sync_fetch_and_add(counter, 1);
}

static __always_inline struct process_event_t *reserve(u32 type) {
    struct process_event_t *event = process_events.ringbuf_reserve(sizeof(*event));
    if (!event) {
        count_drop(D_RINGBUF);
        return 0;
    }
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 uid_gid = bpf_get_current_uid_gid();
    event->ts_ns = bpf_ktime_get_boot_ns();
    event->fork_ns = 0;
    event->cgroup_id = bpf_get_current_cgroup_id();
    event->type = type;
    event->pid = pid_tgid >> 32;
    event->ppid = 0;
    event->uid = (u32)uid_gid;
    event->gid = uid_gid >> 32;
    event->filename[0] = 0;
    bpf_get_current_comm(&event->comm, sizeof(event->comm));
    return event;
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    // Runs in the parent; threads are remembered too and forgotten when they exit.
    struct parent_t parent = {};
    u32 child = args->child_pid;
    parent.ppid = bpf_get_current_pid_tgid() >> 32;
    parent.fork_ns = bpf_ktime_get_boot_ns();
    parents.update(&child, &parent);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    struct process_event_t *event = reserve(EV_EXEC);
    if (!event)
        return 0;
    u32 pid = event->pid;
    struct parent_t *parent = parents.lookup(&pid);
    if (parent) {
        event->ppid = parent->ppid;
        event->fork_ns = parent->fork_ns;
    }
    bpf_probe_read_kernel_str(&event->filename, sizeof(event->filename),
                              (void *)args + (args->data_loc_filename & 0xFFFF));
    process_events.ringbuf_submit(event, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct parent_t *parent = parents.lookup(&tid);
    u32 ppid = parent ? parent->ppid : 0;
    u64 fork_ns = parent ? parent->fork_ns : 0;
    parents.delete(&tid);
    if (tid != pid_tgid >> 32)
        return 0;  // a thread, not the process
    struct process_event_t *event = reserve(EV_EXIT);
    if (!event)
        return 0;
    event->ppid = ppid;
    event->fork_ns = fork_ns;
    process_events.ringbuf_submit(event, 0);
    return 0;
}
