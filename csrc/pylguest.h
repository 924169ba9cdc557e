/*
 * pylguest.h: the boundary between the launcher's Python and its C.
 *
 * Every C function a Python module calls, every structure Python reads or
 * fills, and every constant the two share is declared here, and only
 * here.  csrc/build.py hands this file to cffi as its declarations (a
 * `#define NAME value` becomes `#define NAME ...` and an array length
 * that is not a plain number becomes `[...]`: the compiler fills both
 * in), and cffi compiles its checks against the same file, so a structure
 * Python sees cannot drift from the one C was built with.  What only C
 * uses stays in virtq.h and the .c files.
 *
 * The kernel's side of the boundary -- KVM's structures and ioctls, the
 * tap's flags, virtio's ring and block numbers -- comes from the kernel's
 * own headers, included below; csrc/linux.cdef names the parts Python
 * uses, and their values come from those headers, for C and Python alike.
 */
#ifndef PYL_PYLGUEST_H
#define PYL_PYLGUEST_H

#include <stdint.h>
#include <net/if.h>		/* before <linux/if_tun.h>: struct ifreq */
#include <linux/if_tun.h>
#include <linux/kvm.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_ring.h>

/* ==== The split ring (virtq.c) ==== */

#define PYL_MAX_QUEUE_SIZE	32768	/* virtio 2.7: "maximum is 32768" */
#define PYL_VRING_ALIGN		4096	/* LGUEST_VRING_ALIGN */
#define PYL_MAX_REGIONS		8	/* pylguest makes 1 or 2; tests make more */

/* Guest-physical memory: where each region lives in our address space. */
struct pyl_region {
	uint64_t gpa;
	uint64_t size;
	uint8_t *host;
};

struct pyl_memory {
	int nregions;
	struct pyl_region region[PYL_MAX_REGIONS];
};

/*
 * The rules of the ring, one number each.  Python's RingRule
 * (launcher/pylguest/virtio/queue.py) lists the same rules in the same
 * order, with their names and spec sections.
 */
enum pyl_ring_rule {
	PYL_RULE_NONE = 0,
	PYL_RULE_QUEUE_SIZE,		/* 2.7: a power of two, at most 32768 */
	PYL_RULE_RING_MEMORY,		/* the ring lies in guest memory */
	PYL_RULE_AVAIL_IDX,		/* 2.7.13.3: at most num entries ahead */
	PYL_RULE_HEAD,			/* 2.7.6: a head indexes the table */
	PYL_RULE_LOOP,			/* 2.7.5.2: no descriptor twice */
	PYL_RULE_NEXT,			/* 2.7.5: next indexes its own table */
	PYL_RULE_INDIRECT_FEATURE,	/* 2.7.5.3.1: only if negotiated */
	PYL_RULE_INDIRECT_NESTED,	/* 2.7.5.3.1: no table in a table */
	PYL_RULE_INDIRECT_NEXT,		/* 2.7.5.3.1: not INDIRECT and NEXT */
	PYL_RULE_INDIRECT_SIZE,		/* 2.7.5.3: a non-zero multiple of 16 */
	PYL_RULE_INDIRECT_BOUND,	/* ours: at most 32768 entries */
	PYL_RULE_INDIRECT_MEMORY,	/* the table lies in guest memory */
	PYL_RULE_MEMORY,		/* each buffer lies in guest memory */
	PYL_RULE_ORDER,			/* 2.7.4.2: writable parts come last */
	PYL_RULE_TOTAL,			/* 2.7.5.2: at most 2^32 - 1 bytes */
};

/*
 * What was wrong, in numbers: the rule, and the values its message
 * names.  Python turns this into the VirtqueueError a person reads.
 */
struct pyl_ring_fault {
	int rule;
	int has_head;		/* the chain's head is known (and in range) */
	uint32_t head;
	uint32_t index;		/* the descriptor where the walk stopped */
	uint32_t next;		/* its next field */
	uint32_t table_size;	/* of the table the walk was in */
	int in_indirect;	/* ... which was an indirect table */
	uint64_t addr;		/* the offending buffer or table */
	uint64_t len;
	uint32_t avail_idx;	/* for AVAIL_IDX: what the guest said */
	uint32_t count;		/* ... and how far ahead that is */
};

/* One guest buffer of a chain, checked to lie in guest memory. */
struct pyl_buffer {
	uint64_t gpa;
	uint32_t len;
	uint8_t *host;		/* where its bytes are, for the I/O */
};

/*
 * One request from the guest, parsed: its head, and its buffers, the
 * device-readable ones first (bufs[0 .. nreadable)), then the writable
 * ones.  Buffers of length zero are not kept: they carry no bytes.
 * A chain holds at most num direct descriptors plus one indirect table,
 * so `capacity` is num + PYL_MAX_QUEUE_SIZE.
 */
struct pyl_chain {
	uint16_t head;
	uint32_t nreadable;
	uint32_t nwritable;
	uint64_t readable_len;
	uint64_t writable_len;
	uint32_t capacity;
	struct pyl_buffer *bufs;
};

/* The legacy ring's descriptor and used element (virtio 2.7.5, 2.7.8). */
struct pyl_vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct pyl_vring_used_elem {
	uint32_t id;
	uint32_t len;
};

/* The device's side of one ring: where it is, and our own indices. */
struct pyl_vq {
	const struct pyl_memory *memory;
	uint32_t num;
	struct pyl_vring_desc *desc;
	uint16_t *avail;		/* flags, idx, ring[num], used_event */
	uint16_t *used;			/* flags, idx, then the elements */
	struct pyl_vring_used_elem *used_ring;
	uint16_t *avail_event;
	uint16_t last_avail_idx;	/* available entries consumed (u16) */
	uint16_t used_idx;		/* used entries published (u16) */
	uint16_t signalled_used;	/* used_idx when we last decided on an irq */
	int event_idx;			/* VIRTIO_RING_F_EVENT_IDX negotiated */
	int indirect;			/* VIRTIO_RING_F_INDIRECT_DESC negotiated */
	int notify_enabled;
	struct pyl_ring_fault fault;	/* why the last call said -1 */
	/*
	 * For the tests only (NULL otherwise): called where a driver's
	 * publish is hardest to catch, after the ring looked empty and before
	 * kicks are turned back on, so a test can play that driver.
	 */
	void (*before_enable)(void *data);
	void *before_enable_data;
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

/*
 * Where the parts of a legacy ring of `num` entries at `gpa` lie (2.7.2):
 * the one computation of the layout, for pyl_vq_init() and for Python.
 */
struct pyl_vring_layout {
	uint64_t desc;
	uint64_t avail;
	uint64_t used;
	uint64_t size;			/* bytes, up to the end of avail_event */
};

void pyl_vring_layout(uint64_t gpa, uint32_t num,
		      struct pyl_vring_layout *layout);

/* ==== The block request loop (blk.c) ==== */

#define PYL_BLK_SECTOR_SIZE	512		/* virtio 5.2.6: sectors are 512 bytes */
#define PYL_BLK_HEADER_SIZE	sizeof(struct virtio_blk_outhdr)	/* type, ioprio, sector */
#define PYL_BLK_ID_BYTES	VIRTIO_BLK_ID_BYTES	/* GET_ID's answer: 20 bytes */
#define PYL_BLK_IO_CHUNK	(1 << 20)	/* bytes per system call at most */
#define PYL_BLK_IOV_MAX		1024		/* buffers per call: Linux's UIO_MAXIOV */

struct pyl_blk_inflight;		/* blk.c's: the requests in flight */

/* The disk, and the counters --stats and the tests read. */
struct pyl_blk {
	int fd;
	uint64_t capacity;		/* in 512-byte sectors */
	int read_only;
	int direct;			/* opened O_DIRECT: no page cache */
	uint8_t id[PYL_BLK_ID_BYTES];	/* what GET_ID answers */
	int *abandon;			/* set: drop the request in flight */
	uint64_t requests;		/* requests answered */
	uint64_t syscalls;		/* preadv/pwritev calls made */
	uint64_t largest_syscall;	/* the most bytes one of them asked */
	uint64_t flushes;		/* fdatasync calls made */
	uint32_t most_in_flight;	/* the most io_uring had at once */
	struct pyl_blk_inflight *inflight;
};

/* Why pyl_blk_drain() returned. */
enum pyl_blk_stop {
	PYL_BLK_EMPTY = 0,		/* the ring is empty: kicks are on */
	PYL_BLK_LIMIT,			/* served `limit` requests */
	PYL_BLK_RING_FAULT,		/* a ring rule: vq->fault says which */
	PYL_BLK_REQUEST_FAULT,		/* no status byte, or no header */
	PYL_BLK_ABANDONED,		/* a reset or stop is waiting */
	PYL_BLK_HOST_FAULT,		/* io_uring failed: out->error says how */
};

/* The block rules a request can break without being answerable. */
enum pyl_blk_rule {
	PYL_BLK_RULE_STATUS = 1,	/* 5.2.6: ends in a status byte */
	PYL_BLK_RULE_HEADER,		/* 5.2.6: starts with the header */
};

/* A request as the guest asked it, and the answer: for --trace. */
struct pyl_blk_request {
	uint32_t type;			/* the header's type, as written */
	uint64_t sector;
	uint64_t data_len;
	uint8_t status;
};

struct pyl_blk_outcome {
	int stop;			/* enum pyl_blk_stop */
	uint32_t pushed;		/* requests pushed by this call */
	int rule;			/* for PYL_BLK_REQUEST_FAULT */
	uint16_t head;
	uint64_t readable_len;
	int error;			/* for PYL_BLK_HOST_FAULT: an errno */
	struct pyl_blk_request last;	/* the last request pushed */
};

int pyl_blk_open(struct pyl_blk *blk, int use_io_uring);
void pyl_blk_close(struct pyl_blk *blk);
int pyl_blk_drain(struct pyl_vq *vq, struct pyl_chain *chain,
		  struct pyl_blk *blk, uint32_t limit,
		  struct pyl_blk_outcome *out);


/* ==== The net frame loops (net.c) ==== */

#define PYL_VNET_HDR_SIZE	10	/* legacy virtio_net_hdr, no MRG_RXBUF */
/*
 * The header, then an ethernet frame of up to a 65535-byte packet behind a
 * 14-byte header and a 4-byte VLAN tag.
 */
#define PYL_MAX_FRAME		(PYL_VNET_HDR_SIZE + 14 + 4 + 65535)

/*
 * The stream mode's buffers (a daemon such as passt on a SOCK_STREAM
 * socket, each frame behind its length, 4 bytes big-endian): each holds
 * several whole frames, and always room for the largest one.
 */
#define PYL_STREAM_PREFIX	4
#define PYL_STREAM_FRAME_MAX	(PYL_MAX_FRAME - PYL_VNET_HDR_SIZE)	/* no header */
#define PYL_STREAM_BUF		(256 * 1024)

enum pyl_net_mode {
	PYL_NET_MODE_TAP = 0,		/* a tap with IFF_VNET_HDR: frames kept */
	PYL_NET_MODE_STREAM,		/* [4-byte BE length][frame], no header */
};

struct pyl_net {
	int tap;			/* non-blocking, keeps frame boundaries */
	int *abandon;			/* set: drop the frame in flight */
	uint8_t *bounce;		/* PYL_MAX_FRAME bytes */
	uint64_t sent;
	uint64_t dropped;		/* transmit failed: a link that is down */
	uint64_t received;
	int read_errno;			/* the last failed tap read, or 0 */
	/* Stream mode only (mode PYL_NET_MODE_STREAM; `tap` is the socket). */
	int mode;			/* enum pyl_net_mode */
	uint8_t *tx;			/* PYL_STREAM_BUF bytes: framed, unsent */
	uint32_t tx_start, tx_end;	/* the unsent bytes: tx[tx_start..tx_end) */
	uint8_t *rx;			/* PYL_STREAM_BUF bytes: read, not given */
	uint32_t rx_start, rx_end;	/* ... rx[rx_start..rx_end) */
	uint64_t bad_length;		/* the length a STREAM_FAULT read */
	int write_errno;		/* the write that lost the stream, or 0 */
};

enum pyl_net_stop {
	PYL_NET_DONE = 0,		/* transmit: the ring is empty */
	PYL_NET_TAP_EMPTY,		/* receive: no frame waiting */
	PYL_NET_STARVED,		/* receive: a frame, but no buffer */
	PYL_NET_RING_FAULT,		/* a ring rule: vq->fault says which */
	PYL_NET_FRAME_FAULT,		/* 5.1.6: a sent frame's size */
	PYL_NET_ROOM_FAULT,		/* 5.1.6: room for the header */
	PYL_NET_ABANDONED,		/* a reset or stop is waiting */
	PYL_NET_STREAM_FULL,		/* transmit: the unsent bytes fill tx */
	PYL_NET_STREAM_FAULT,		/* receive: a frame length out of range */
	PYL_NET_STREAM_CLOSED,		/* the peer closed, or a fatal error */
};

struct pyl_net_outcome {
	int stop;			/* enum pyl_net_stop */
	uint32_t pushed;
	uint16_t head;			/* for the two faults */
	uint64_t len;			/* the frame's or the room's bytes */
};

int pyl_net_transmit(struct pyl_vq *vq, struct pyl_chain *chain,
		     struct pyl_net *net, struct pyl_net_outcome *out);
int pyl_net_receive(struct pyl_vq *vq, struct pyl_chain *chain,
		    struct pyl_net *net, struct pyl_net_outcome *out);
int pyl_net_flush(struct pyl_net *net);


/* ==== KVM (kvm.c): its ioctls, and a vCPU stop without a race ==== */

#define PYL_IFREQ_SIZE		sizeof(struct ifreq)

/* ioctl() is variadic: one wrapper per argument kind, each with its C type. */
int pyl_ioctl(int fd, unsigned long request, void *arg);
int pyl_ioctl_val(int fd, unsigned long request, unsigned long arg);
int pyl_run(int vcpu_fd);
int pyl_arm_stop_signals(struct kvm_run *run, int *signals, int count);
void pyl_disarm_stop_signals(void);
int pyl_stop_signal(void);
void pyl_request_stop(int signo);
void pyl_wake_vcpu(void);

/* ==== The run loop's fast path (run_fast.c) ==== */

#define PYL_FAST_RING_SIZE	4096	/* a power of two: head and tail wrap freely */
#define PYL_FAST_REASONS	64	/* KVM_EXIT_* numbers counted per reason */

struct pyl_fast {
	/* Published by Python: the port bus's claims, the UART's state. */
	uint8_t claimed[65536 / 8];	/* one bit per port that a device claims */
	uint16_t uart_base;
	uint8_t uart_thr_plain;		/* a THR write is only output (see uart.py) */
	uint8_t uart_lsr;		/* LSR's value now; 0: Python must read it */
	/* Console bytes: C writes at head, Python takes at tail. */
	uint32_t out_head;
	uint32_t out_tail;
	uint32_t out_kicked;		/* kick_fd written since Python last took */
	int32_t kick_fd;		/* an eventfd, or -1 */
	uint8_t out[PYL_FAST_RING_SIZE];
	/* Exits answered here, by reason: --stats counts them as well. */
	uint64_t answered[PYL_FAST_REASONS];
};

int pyl_run_fast(int vcpu_fd, struct kvm_run *run, struct pyl_fast *fp);
int pyl_fast_answer(struct pyl_fast *fp, struct kvm_run *run);
uint32_t pyl_fast_take(struct pyl_fast *fp, uint8_t *buf, uint32_t size);

#endif
