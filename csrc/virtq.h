/*
 * The device half of a legacy split virtqueue, in C: the one
 * implementation of the ring's rules that every pylguest device uses.
 *
 * virtq.c is the tour (the ring, the chain walk and its rules); blk.c and
 * net.c are the request loops that drive it without entering Python per
 * request.  Python reaches all three through cffi (csrc/dataplane_build.py)
 * and keeps the control plane: features, status, reset, and what to do
 * about a broken rule.
 */
#ifndef PYL_VIRTQ_H
#define PYL_VIRTQ_H

#include <stdint.h>

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

/*
 * The legacy ring layout (virtio 2.7.2), as the guest lays it out.
 * These are views of guest memory: every field is the guest's to change
 * at any moment, so each is read once, with READ_ONCE, into a local, and
 * then checked; our stores are WRITE_ONCE, so the compiler neither tears,
 * repeats nor drops them.
 */
#define READ_ONCE(x)		__atomic_load_n(&(x), __ATOMIC_RELAXED)
#define WRITE_ONCE(x, v)	__atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

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
int pyl_vq_peek(struct pyl_vq *vq, struct pyl_chain *chain);
int pyl_vq_pop(struct pyl_vq *vq, struct pyl_chain *chain);
int pyl_vq_pop_with_notify(struct pyl_vq *vq, struct pyl_chain *chain);
void pyl_vq_consume(struct pyl_vq *vq);
void pyl_vq_push(struct pyl_vq *vq, uint16_t head, uint32_t len);
int pyl_vq_needs_interrupt(struct pyl_vq *vq);
int pyl_vq_set_notification(struct pyl_vq *vq, int enabled);
uint8_t *pyl_guest_range(const struct pyl_memory *memory, uint64_t gpa,
			 uint64_t len);
uint64_t pyl_chain_copy_out(const struct pyl_chain *chain, uint64_t offset,
			    uint8_t *dst, uint64_t len);
uint64_t pyl_chain_copy_in(const struct pyl_chain *chain, uint64_t offset,
			   const uint8_t *src, uint64_t len);

#endif
