"""cffi build script: the data plane, pylguest._dataplane.

The split ring (virtq.c), the block request loop (blk.c) and the net frame
loops (net.c) are C, compiled into one extension; Python sees the
structures below (only the fields it reads or sets: `...;` leaves the rest
to the compiler) and the functions.  cffi releases the GIL for every call,
so a device's worker serves a whole batch of requests while the vCPU
thread and the other devices run.
"""

import os

import cffi

# setuptools wants source paths relative to setup.py (the repository root).
HERE = os.path.relpath(os.path.dirname(os.path.abspath(__file__)))

ffibuilder = cffi.FFI()

ffibuilder.cdef(r"""
#define PYL_MAX_QUEUE_SIZE ...
#define PYL_MAX_REGIONS ...
#define PYL_BLK_ID_BYTES ...
#define PYL_BLK_IO_CHUNK ...
#define PYL_BLK_IOV_MAX ...
#define PYL_VNET_HDR_SIZE ...
#define PYL_MAX_FRAME ...

struct pyl_region { uint64_t gpa; uint64_t size; uint8_t *host; };
struct pyl_memory { int nregions; struct pyl_region region[...]; ...; };

enum pyl_ring_rule {
    PYL_RULE_NONE, PYL_RULE_QUEUE_SIZE, PYL_RULE_RING_MEMORY, PYL_RULE_AVAIL_IDX,
    PYL_RULE_HEAD, PYL_RULE_LOOP, PYL_RULE_NEXT, PYL_RULE_INDIRECT_FEATURE,
    PYL_RULE_INDIRECT_NESTED, PYL_RULE_INDIRECT_NEXT, PYL_RULE_INDIRECT_SIZE,
    PYL_RULE_INDIRECT_BOUND, PYL_RULE_INDIRECT_MEMORY, PYL_RULE_MEMORY,
    PYL_RULE_ORDER, PYL_RULE_TOTAL, ...
};

struct pyl_ring_fault {
    int rule; int has_head; uint32_t head; uint32_t index; uint32_t next;
    uint32_t table_size; int in_indirect; uint64_t addr; uint64_t len;
    uint32_t avail_idx; uint32_t count;
};

struct pyl_buffer { uint64_t gpa; uint32_t len; uint8_t *host; };

struct pyl_chain {
    uint16_t head; uint32_t nreadable; uint32_t nwritable;
    uint64_t readable_len; uint64_t writable_len;
    uint32_t capacity; struct pyl_buffer *bufs;
};

struct pyl_vq {
    uint32_t num;
    uint16_t last_avail_idx; uint16_t used_idx; uint16_t signalled_used;
    int event_idx; int indirect; int notify_enabled;
    struct pyl_ring_fault fault;
    void (*before_enable)(void *data);
    void *before_enable_data;
    ...;
};

int pyl_vq_init(struct pyl_vq *vq, const struct pyl_memory *memory,
                uint32_t num, uint64_t pfn, int event_idx, int indirect);
void pyl_vq_reset(struct pyl_vq *vq);
int pyl_vq_pending(struct pyl_vq *vq);
int pyl_vq_pop(struct pyl_vq *vq, struct pyl_chain *chain);
int pyl_vq_pop_with_notify(struct pyl_vq *vq, struct pyl_chain *chain);
void pyl_vq_push(struct pyl_vq *vq, uint16_t head, uint32_t len);
int pyl_vq_needs_interrupt(struct pyl_vq *vq);
int pyl_vq_set_notification(struct pyl_vq *vq, int enabled);

struct pyl_blk {
    int fd; uint64_t capacity; int read_only; uint8_t id[...];
    int *abandon;
    uint64_t requests; uint64_t syscalls; uint64_t largest_syscall; uint64_t flushes;
    uint32_t most_in_flight;
    ...;
};
enum pyl_blk_stop { PYL_BLK_EMPTY, PYL_BLK_LIMIT, PYL_BLK_RING_FAULT,
                    PYL_BLK_REQUEST_FAULT, PYL_BLK_ABANDONED, PYL_BLK_HOST_FAULT, ... };
enum pyl_blk_rule { PYL_BLK_RULE_STATUS, PYL_BLK_RULE_HEADER, ... };
struct pyl_blk_request { uint32_t type; uint64_t sector; uint64_t data_len; uint8_t status; };
struct pyl_blk_outcome {
    int stop; uint32_t pushed; int rule; uint16_t head; uint64_t readable_len; int error;
    struct pyl_blk_request last;
};
int pyl_blk_open(struct pyl_blk *blk, int use_io_uring);
void pyl_blk_close(struct pyl_blk *blk);
int pyl_blk_drain(struct pyl_vq *vq, struct pyl_chain *chain, struct pyl_blk *blk,
                  uint32_t limit, struct pyl_blk_outcome *out);

#define PYL_STREAM_PREFIX ...
#define PYL_STREAM_FRAME_MAX ...
#define PYL_STREAM_BUF ...
enum pyl_net_mode { PYL_NET_MODE_TAP, PYL_NET_MODE_STREAM, ... };
struct pyl_net {
    int tap; int *abandon; uint8_t *bounce;
    uint64_t sent; uint64_t dropped; uint64_t received; int read_errno;
    int mode; uint8_t *tx; uint32_t tx_start; uint32_t tx_end;
    uint8_t *rx; uint32_t rx_start; uint32_t rx_end;
    uint64_t bad_length; int write_errno;
};
enum pyl_net_stop { PYL_NET_DONE, PYL_NET_TAP_EMPTY, PYL_NET_STARVED, PYL_NET_RING_FAULT,
                    PYL_NET_FRAME_FAULT, PYL_NET_ROOM_FAULT, PYL_NET_ABANDONED,
                    PYL_NET_STREAM_FULL, PYL_NET_STREAM_FAULT, PYL_NET_STREAM_CLOSED, ... };
struct pyl_net_outcome { int stop; uint32_t pushed; uint16_t head; uint64_t len; };
int pyl_net_transmit(struct pyl_vq *vq, struct pyl_chain *chain, struct pyl_net *net,
                     struct pyl_net_outcome *out);
int pyl_net_receive(struct pyl_vq *vq, struct pyl_chain *chain, struct pyl_net *net,
                    struct pyl_net_outcome *out);
int pyl_net_flush(struct pyl_net *net);
""")

ffibuilder.set_source(
    "pylguest._dataplane",
    '#include "virtq.h"\n#include "blk.h"\n#include "net.h"\n',
    sources=[os.path.join(HERE, name) for name in ("virtq.c", "blk.c", "net.c")],
    include_dirs=[HERE],
    libraries=["uring"],            # liburing: block requests in flight together
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir="build/cffi", verbose=False)
