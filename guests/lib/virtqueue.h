/*
 * virtqueue.h: the driver (guest) side of a legacy split virtqueue.
 *
 * A virtqueue is how a guest hands buffers to a device and gets them
 * back. It lives in pages the launcher set aside after the device page
 * (the vqconfig's pfn), laid out as virtio 0.9.5 (legacy) says, for a
 * queue of `num` entries at ring = pfn << 12:
 *
 *   ring + 0          descriptor table: num x {u64 addr; u32 len;
 *                                              u16 flags; u16 next}
 *   ring + 16*num     available ring, written by us:
 *                       u16 flags; u16 idx; u16 ring[num]; u16 used_event
 *   (pad to 4096)
 *   used ring         written by the device:
 *                       u16 flags; u16 idx; {u32 id; u32 len} ring[num];
 *                       u16 avail_event
 *
 * One request is a chain of descriptors: first the buffers the device
 * reads (the request), then the ones it writes (room for the answer).
 * We put the chain's first ("head") descriptor's index in the available
 * ring and bump avail->idx; the device does the work, puts the head and
 * how many bytes it wrote in the used ring and bumps used->idx.
 *
 * Two optional features change the bookkeeping, and this library does
 * both ways, chosen at vq_init():
 *   VIRTIO_RING_F_INDIRECT_DESC: a chain can be one ring descriptor that
 *     points at a table of descriptors somewhere else in guest memory, so
 *     a long request takes one ring slot.
 *   VIRTIO_RING_F_EVENT_IDX: instead of on/off flags, each side writes
 *     "tell me when your index passes N" (used_event for interrupts,
 *     avail_event for kicks), so notifications can be batched.
 *
 * No allocator: everything a queue needs is in struct virtqueue, which
 * the guest declares static.
 */
#ifndef GUEST_VIRTQUEUE_H
#define GUEST_VIRTQUEUE_H

#include "types.h"

/* Descriptor flags. */
#define VRING_DESC_F_NEXT	1	/* the chain goes on at `next` */
#define VRING_DESC_F_WRITE	2	/* the device writes this buffer */
#define VRING_DESC_F_INDIRECT	4	/* the buffer is a descriptor table */

#define VRING_AVAIL_F_NO_INTERRUPT	1	/* us to device: don't interrupt */
#define VRING_USED_F_NO_NOTIFY		1	/* device to us: don't kick */

/* Feature bits (in every device's feature bitmap). */
#define VIRTIO_RING_F_INDIRECT_DESC	28
#define VIRTIO_RING_F_EVENT_IDX		29

#define VRING_ALIGN		4096	/* LGUEST_VRING_ALIGN */

/* Our static limits. The launcher's queues have 64 to 256 entries. */
#define VQ_MAX_NUM		256
#define VQ_INDIRECT_TABLES	4	/* indirect requests in flight */
#define VQ_INDIRECT_MAX		8	/* segments in one indirect request */

/* Every field is naturally aligned, so no `packed` is needed; the static
 * asserts in virtqueue.c check the sizes the layout above assumes. */
struct vring_desc {
	u64 addr;			/* guest-physical */
	u32 len;
	u16 flags;
	u16 next;
};

struct vring_avail {
	u16 flags;
	u16 idx;			/* where we put the next entry */
	u16 ring[];			/* num heads, then u16 used_event */
};

struct vring_used_elem {
	u32 id;				/* the head of the chain given back */
	u32 len;			/* bytes the device wrote into it */
};

struct vring_used {
	u16 flags;
	u16 idx;			/* where the device puts the next entry */
	struct vring_used_elem ring[];	/* num entries, then u16 avail_event */
};

/* One buffer of a request: identity mapped, so a pointer is an address. */
struct vq_seg {
	void *addr;
	u32 len;
};

struct virtqueue {
	const char *name;		/* for messages: "block/requests" */
	unsigned int num;		/* entries, a power of two */
	u64 ring_gpa;			/* pfn << 12: also the kick address */
	bool event_idx;			/* VIRTIO_RING_F_EVENT_IDX accepted */
	bool indirect;			/* VIRTIO_RING_F_INDIRECT_DESC accepted */
	bool broken;			/* the device gave back nonsense */

	/* The three parts of the ring, in the launcher's pages. */
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	u16 *used_event;		/* after avail->ring[num]: ours */
	u16 *avail_event;		/* after used->ring[num]: the device's */

	/*
	 * Our own bookkeeping. It is kept here, not in the shared ring, so
	 * that nothing the device writes can confuse it: the free list
	 * (next_free), and for every head in flight the caller's token, how
	 * many descriptors the chain took and its last one.
	 */
	u16 free_head;
	unsigned int num_free;
	u16 next_free[VQ_MAX_NUM];
	void *token[VQ_MAX_NUM];
	u16 chain_len[VQ_MAX_NUM];
	u16 chain_tail[VQ_MAX_NUM];
	s8 indirect_of[VQ_MAX_NUM];	/* which table, -1 for none */

	u16 avail_idx;			/* our copy of avail->idx */
	u16 kicked_idx;			/* avail_idx at the last kick decision */
	u16 last_used_idx;		/* used entries we have consumed */
	bool interrupts;		/* vq_enable_interrupts() in force */

	/* Indirect descriptor tables: 16-byte aligned, as the ring's is. */
	struct vring_desc indirect_table[VQ_INDIRECT_TABLES][VQ_INDIRECT_MAX]
		__attribute__((aligned(16)));
	bool indirect_busy[VQ_INDIRECT_TABLES];

	/* Counters, for the guests to print. */
	unsigned int kicks, kicks_suppressed;
};

/* Bytes a ring of num entries takes (the seed's vring_size()). */
u64 vring_size(unsigned int num);

/*
 * Take over the ring of num entries at pfn << 12: zero it and start all
 * indices at 0, as the device does after a reset. Returns false (with a
 * line saying why) if num is not a power of two in 1..VQ_MAX_NUM.
 */
bool vq_init(struct virtqueue *vq, const char *name, unsigned int num,
	     u32 pfn, bool event_idx, bool indirect);

/*
 * Add one request: n_out buffers the device reads, then n_in it writes.
 * `token` (not NULL) comes back from vq_get_used() when the device is
 * done with it. With use_indirect (and the feature accepted), the chain
 * goes in an indirect table and takes one ring descriptor.
 * Returns the head index, or -1 if the ring (or the tables) is full.
 * The device sees the request only after vq_kick().
 */
int vq_add(struct virtqueue *vq, const struct vq_seg *out, unsigned int n_out,
	   const struct vq_seg *in, unsigned int n_in, void *token,
	   bool use_indirect);

/*
 * The same, always indirect, in a table the caller provides (16-byte
 * aligned, n_out + n_in entries, untouched until the request comes back):
 * for a guest that keeps more long requests in flight than our own
 * VQ_INDIRECT_TABLES allow. Needs VIRTIO_RING_F_INDIRECT_DESC.
 */
int vq_add_in_table(struct virtqueue *vq, struct vring_desc *table,
		    const struct vq_seg *out, unsigned int n_out,
		    const struct vq_seg *in, unsigned int n_in, void *token);

/* Tell the device about what vq_add() put in the ring, unless it said it
 * does not want to hear (VRING_USED_F_NO_NOTIFY, or avail_event). */
void vq_kick(struct virtqueue *vq);

/* Has the device given something back that we have not taken yet? */
bool vq_has_used(const struct virtqueue *vq);

/* The next request the device has finished: its token, and in *len the
 * bytes the device wrote. NULL if there is none (or the ring is broken). */
void *vq_get_used(struct virtqueue *vq, u32 *len);

/*
 * Interrupts for this queue. vq_enable_interrupts() returns true if
 * buffers were given back meanwhile: the caller must look at the used
 * ring before sleeping, since no interrupt will come for those.
 */
void vq_disable_interrupts(struct virtqueue *vq);
bool vq_enable_interrupts(struct virtqueue *vq);

/*
 * Sleep (sti; hlt) until the device gives something back, or timeout_ms
 * pass (0: forever). Needs timer_init() for the timeout, and for polling
 * when the queue's interrupts are off. Returns vq_has_used().
 */
bool vq_wait(struct virtqueue *vq, unsigned int timeout_ms);

#endif
