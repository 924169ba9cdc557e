/*
 * A tour of the device half of a split virtqueue (virtio 1.x, 2.7).
 *
 * A virtqueue is three arrays in guest memory that the guest's driver and
 * our device share.  lguest uses the legacy layout (2.7.2, "Legacy
 * Interfaces: A Note on Virtqueue Layout"): a ring of `num` entries lives
 * at guest-physical pfn << 12 as one block,
 *
 *	descriptor table   num x {u64 addr; u32 len; u16 flags; u16 next}
 *	available ring     u16 flags; u16 idx; u16 ring[num]; u16 used_event
 *	(padding up to the next 4096-byte boundary)
 *	used ring          u16 flags; u16 idx; {u32 id; u32 len} ring[num];
 *			   u16 avail_event
 *
 * all little-endian (x86, like the host: no byte swaps here).  The driver
 * writes descriptors and the available ring; we read them, do the I/O,
 * and write the used ring.
 *
 * Everything the guest wrote may be garbage or hostile, and may change
 * while we look at it.  So we follow Firecracker: parse, then act.
 * pyl_vq_pop() reads each descriptor of a chain exactly once, into
 * locals, checks every rule, and fills in a struct pyl_chain of plain
 * (gpa, len, host pointer) buffers; device code works from that and never
 * from the descriptor table, so a guest rewriting a descriptor after we
 * checked it changes nothing.  A broken rule makes the call return -1
 * with vq->fault saying which rule and what numbers; what to do about it
 * is decided by the caller, never here.
 *
 * The indices.  avail.idx and used.idx are free-running u16 counters:
 * they count entries ever added, wrap at 65536, and a ring slot is
 * idx % num (num is a power of two, so the slots stay in step across the
 * wrap).  We keep our own copies, last_avail_idx and used_idx, and never
 * read back the guest's used.idx: the guest can write it, and must not
 * be able to make us overwrite entries it has not read yet.
 *
 * Threads: one ring is driven by one thread at a time (its device holds
 * a lock); nothing here locks.
 */
#include <string.h>

#include "virtq.h"

/*
 * The flags are the kernel's (<linux/virtio_ring.h>, through pylguest.h),
 * and Python reads the same ones: VRING_DESC_F_NEXT (the buffer continues
 * in `next`), _WRITE (device-writable), _INDIRECT (the buffer is a table,
 * 2.7.5.3); VRING_USED_F_NO_NOTIFY (to the driver: don't kick, 2.7.10);
 * VRING_AVAIL_F_NO_INTERRUPT (to us: don't interrupt, 2.7.7).
 */
#define DESC_SIZE		sizeof(struct pyl_vring_desc)
#define U32_MAX			0xffffffffULL

/*
 * Loads and stores of guest memory are READ_ONCE and WRITE_ONCE
 * (virtq.h), so the compiler does each exactly where the code says, once.
 * On x86 the CPU keeps loads in order with loads and stores with stores;
 * the one reordering it does (a load passing an earlier store) is what
 * full_barrier() is for.
 */
static inline void full_barrier(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);	/* an mfence */
}

static inline void compiler_barrier(void)
{
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/*
 * The one gate to guest memory (lguest's check_pointer): the whole range
 * [gpa, gpa + len) must lie inside one region, with no wraparound.
 * Checking only the first byte is the classic hole; we check the last too.
 * Returns where the range is in our address space, or NULL.
 */
uint8_t *pyl_guest_range(const struct pyl_memory *memory, uint64_t gpa,
			 uint64_t len)
{
	int i;

	for (i = 0; i < memory->nregions; i++) {
		const struct pyl_region *r = &memory->region[i];

		/*
		 * Written so that nothing can overflow: gpa - r->gpa is only
		 * taken once gpa >= r->gpa.
		 */
		if (gpa >= r->gpa && len <= r->size &&
		    gpa - r->gpa <= r->size - len)
			return r->host + (gpa - r->gpa);
	}
	return NULL;
}

static uint64_t align_up(uint64_t value, uint64_t align)
{
	return (value + align - 1) & ~(align - 1);
}

static int refuse(struct pyl_vq *vq, int rule)
{
	vq->fault.rule = rule;
	return -1;
}

/*
 * Where the parts of a ring are (2.7.2, legacy layout), and the checks
 * that the whole block lies in guest memory.
 */
void pyl_vring_layout(uint64_t gpa, uint32_t num,
		      struct pyl_vring_layout *layout)
{
	uint64_t avail = DESC_SIZE * (uint64_t)num;
	uint64_t used = align_up(avail + 2 * (3 + (uint64_t)num),
				 PYL_VRING_ALIGN);

	layout->desc = gpa;
	layout->avail = gpa + avail;
	layout->used = gpa + used;
	layout->size = used + 2 * 3 + 8 * (uint64_t)num;
}

int pyl_vq_init(struct pyl_vq *vq, const struct pyl_memory *memory,
		uint32_t num, uint64_t pfn, int event_idx, int indirect)
{
	struct pyl_vring_layout ring;
	uint8_t *host;

	memset(vq, 0, sizeof(*vq));
	vq->memory = memory;
	vq->event_idx = event_idx;
	vq->indirect = indirect;
	vq->fault.len = num;
	vq->fault.addr = pfn;
	/*
	 * 2.7: "Queue Size value is always a power of 2.  The maximum Queue
	 * Size value is 32768."  The slot arithmetic (idx % num across the
	 * u16 wrap) depends on the power of two.
	 */
	if (num == 0 || num > PYL_MAX_QUEUE_SIZE || (num & (num - 1)))
		return refuse(vq, PYL_RULE_QUEUE_SIZE);
	/* A pfn this large would wrap when shifted: it is not in memory. */
	if (pfn >> 52)
		return refuse(vq, PYL_RULE_RING_MEMORY);
	pyl_vring_layout(pfn << 12, num, &ring);
	host = pyl_guest_range(memory, ring.desc, ring.size);
	if (!host)
		return refuse(vq, PYL_RULE_RING_MEMORY);

	vq->num = num;
	vq->desc = (struct pyl_vring_desc *)host;
	vq->avail = (uint16_t *)(host + (ring.avail - ring.desc));
	vq->used = (uint16_t *)(host + (ring.used - ring.desc));
	vq->used_ring = (struct pyl_vring_used_elem *)((uint8_t *)vq->used + 4);
	vq->avail_event = (uint16_t *)((uint8_t *)vq->used + 4 + 8 * num);
	pyl_vq_reset(vq);
	return 0;
}

/*
 * Forget all ring state: the guest reset the device.  Guest memory is not
 * touched: after a reset the ring pages belong to the driver again.
 */
void pyl_vq_reset(struct pyl_vq *vq)
{
	vq->last_avail_idx = 0;
	vq->used_idx = 0;
	vq->signalled_used = 0;
	vq->notify_enabled = 1;
	memset(&vq->fault, 0, sizeof(vq->fault));
}

/* How many available entries we have not popped yet, or -1. */
int pyl_vq_pending(struct pyl_vq *vq)
{
	uint16_t avail_idx = READ_ONCE(vq->avail[1]);
	uint16_t count = avail_idx - vq->last_avail_idx;

	/*
	 * 2.7.13.3: the driver adds at most num entries we have not
	 * consumed, since the ring has only num slots.  More means it lies.
	 */
	if (count > vq->num) {
		vq->fault.avail_idx = avail_idx;
		vq->fault.count = count;
		vq->fault.has_head = 0;
		return refuse(vq, PYL_RULE_AVAIL_IDX);
	}
	return count;
}

/* The rules of 2.7.5.3 for a descriptor that points at a table. */
static int check_indirect(struct pyl_vq *vq, uint64_t addr, uint32_t len,
			  uint16_t flags, int in_indirect)
{
	vq->fault.addr = addr;
	vq->fault.len = len;
	if (!vq->indirect)
		return refuse(vq, PYL_RULE_INDIRECT_FEATURE);
	if (in_indirect)
		return refuse(vq, PYL_RULE_INDIRECT_NESTED);
	if (flags & VRING_DESC_F_NEXT)
		return refuse(vq, PYL_RULE_INDIRECT_NEXT);
	if (len == 0 || len % DESC_SIZE)
		return refuse(vq, PYL_RULE_INDIRECT_SIZE);
	/*
	 * Our own bound, so one table cannot make us walk millions of
	 * entries; Linux never builds a table this large.
	 */
	if (len / DESC_SIZE > PYL_MAX_QUEUE_SIZE)
		return refuse(vq, PYL_RULE_INDIRECT_BOUND);
	if (!pyl_guest_range(vq->memory, addr, len))
		return refuse(vq, PYL_RULE_INDIRECT_MEMORY);
	return 0;
}

/* One buffer of the chain: in guest memory, first byte and last. */
static int add_buffer(struct pyl_vq *vq, struct pyl_chain *chain,
		      uint64_t addr, uint32_t len)
{
	struct pyl_buffer *buf;
	uint8_t *host;

	vq->fault.addr = addr;
	vq->fault.len = len;
	host = pyl_guest_range(vq->memory, addr, len);
	if (!host)
		return refuse(vq, PYL_RULE_MEMORY);
	/*
	 * The walk visits at most capacity descriptors (the TTL below),
	 * so this cannot fill; the check keeps it so if the TTL changes.
	 */
	if (chain->nreadable + chain->nwritable >= chain->capacity)
		return refuse(vq, PYL_RULE_LOOP);
	buf = &chain->bufs[chain->nreadable + chain->nwritable];
	buf->gpa = addr;
	buf->len = len;
	buf->host = host;
	return 0;
}

/* Walk the chain from `head`: every check, each descriptor read once. */
static int walk_chain(struct pyl_vq *vq, uint16_t head,
		      struct pyl_chain *chain)
{
	struct pyl_vring_desc *table = vq->desc;
	uint32_t table_size = vq->num, ttl = vq->num, index = head;
	int in_indirect = 0, seen_writable = 0;
	struct pyl_ring_fault *fault = &vq->fault;

	chain->head = head;
	chain->nreadable = chain->nwritable = 0;
	chain->readable_len = chain->writable_len = 0;
	fault->has_head = 1;
	fault->head = head;
	if (head >= vq->num) {
		fault->has_head = 0;
		return refuse(vq, PYL_RULE_HEAD);
	}

	for (;;) {
		uint64_t addr;
		uint32_t len;
		uint16_t flags, next;

		fault->index = index;
		fault->table_size = table_size;
		fault->in_indirect = in_indirect;
		/*
		 * The TTL: a chain visits at most table_size descriptors of a
		 * table.  A longer walk must have looped, which 2.7.5.2
		 * forbids ("this implies that loops in the descriptor chain
		 * are forbidden").
		 */
		if (ttl == 0)
			return refuse(vq, PYL_RULE_LOOP);
		ttl--;
		/* Read the descriptor once; from here on only the copies. */
		addr = READ_ONCE(table[index].addr);
		len = READ_ONCE(table[index].len);
		flags = READ_ONCE(table[index].flags);
		next = READ_ONCE(table[index].next);

		if (flags & VRING_DESC_F_INDIRECT) {
			if (check_indirect(vq, addr, len, flags, in_indirect))
				return -1;
			table = (struct pyl_vring_desc *)
				pyl_guest_range(vq->memory, addr, len);
			table_size = len / DESC_SIZE;
			ttl = table_size;
			in_indirect = 1;
			index = 0;	/* 2.7.5.3: the table starts at entry 0 */
			continue;
		}

		if (len && add_buffer(vq, chain, addr, len))
			return -1;
		if (flags & VRING_DESC_F_WRITE) {
			seen_writable = 1;
			chain->nwritable += len != 0;
			chain->writable_len += len;
		} else {
			/*
			 * 2.7.4.2: "The driver MUST place any device-writable
			 * descriptor elements after any device-readable
			 * descriptor elements."
			 */
			if (seen_writable)
				return refuse(vq, PYL_RULE_ORDER);
			chain->nreadable += len != 0;
			chain->readable_len += len;
		}
		/*
		 * 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer
		 * than 2^32 bytes in total"; used.len is a u32 and must be
		 * able to say it.
		 */
		if (chain->readable_len + chain->writable_len > U32_MAX)
			return refuse(vq, PYL_RULE_TOTAL);

		if (!(flags & VRING_DESC_F_NEXT))
			return 0;
		if (next >= table_size) {
			fault->next = next;
			return refuse(vq, PYL_RULE_NEXT);
		}
		index = next;
	}
}

/*
 * The next available chain, fully validated, without taking it: 1 and
 * *chain filled in, 0 if there is none, -1 if the guest broke a rule.
 * For a device that must look at a request before it knows it can serve
 * it (net receive: is there a frame for this buffer?); pyl_vq_consume()
 * then takes it, with no second walk that the guest could race.
 */
int pyl_vq_peek(struct pyl_vq *vq, struct pyl_chain *chain)
{
	int pending = pyl_vq_pending(vq);

	if (pending <= 0)
		return pending;
	/*
	 * On x86 loads are not reordered with other loads, so having read
	 * avail.idx first we see the ring entry and descriptors the driver
	 * wrote before publishing it (its side of 2.7.13.3).  The compiler
	 * must not reorder them either.
	 */
	compiler_barrier();
	if (walk_chain(vq, READ_ONCE(vq->avail[2 + vq->last_avail_idx % vq->num]),
		       chain))
		return -1;
	return 1;
}

/*
 * The next available chain, taken: 1 and *chain filled in, 0 if there is
 * none, -1 if the guest broke a rule.  The ring entry is consumed even
 * when its chain is then refused (fault.head names it).
 */
int pyl_vq_pop(struct pyl_vq *vq, struct pyl_chain *chain)
{
	int got = pyl_vq_peek(vq, chain);

	if (got == 0 || (got < 0 && vq->fault.rule == PYL_RULE_AVAIL_IDX))
		return got;
	vq->last_avail_idx++;
	return got;
}

/*
 * Return a chain to the guest, saying `len` bytes were written into it.
 * 2.7.8.2: the element first, then used.idx, so the driver never sees an
 * index covering a stale element.  x86 keeps stores in order; the
 * compiler barrier keeps the compiler from swapping them.
 */
void pyl_vq_push(struct pyl_vq *vq, uint16_t head, uint32_t len)
{
	struct pyl_vring_used_elem *elem;

	elem = &vq->used_ring[vq->used_idx % vq->num];
	WRITE_ONCE(elem->id, head);
	WRITE_ONCE(elem->len, len);
	compiler_barrier();
	vq->used_idx++;
	WRITE_ONCE(vq->used[1], vq->used_idx);
}

/*
 * vring_need_event() is the spec's helper (2.7.7.2), as the kernel's
 * <linux/virtio_ring.h> gives it: the other side asked to be told once
 * entry number event_idx is reached, and we have gone from old to new
 * since we last told it,
 *
 *	(u16)(new - event_idx - 1) < (u16)(new - old)
 *
 * All u16: the subtraction wraps, which is what makes it right across
 * 65535 -> 0.
 */

/*
 * After pushes: should we interrupt the guest now?  Without EVENT_IDX the
 * guest can only say "never" (VRING_AVAIL_F_NO_INTERRUPT, 2.7.7); with it,
 * the guest writes used_event, "interrupt me once used.idx passes this".
 */
int pyl_vq_needs_interrupt(struct pyl_vq *vq)
{
	uint16_t old = vq->signalled_used, new = vq->used_idx;

	vq->signalled_used = new;
	if (old == new)
		return 0;	/* nothing published since last time */
	/*
	 * used.idx was stored above; the guest's flag or used_event must be
	 * read after that store is visible, or guest and device can each
	 * miss the other's update and the guest sleeps forever.  On x86 a
	 * load may pass an earlier store: a full barrier is needed here.
	 */
	full_barrier();
	if (vq->event_idx)
		return vring_need_event(READ_ONCE(vq->avail[2 + vq->num]), new,
					old);
	return !(READ_ONCE(vq->avail[0]) & VRING_AVAIL_F_NO_INTERRUPT);
}

/*
 * Ask the guest to kick us (enabled) or not to bother.  Without EVENT_IDX
 * this is VRING_USED_F_NO_NOTIFY in used.flags (2.7.10).  With it the flag
 * is ignored by the driver; instead avail_event = last_avail_idx asks for
 * a kick when it adds the entry after those we consumed, and disabling is
 * a no-op (the old avail_event is already behind).
 *
 * Returns 1 when entries are available that we have not popped, 0 when
 * none, -1 for a lying avail.idx.  A backend that finds the ring empty
 * and re-enables kicks must look once more when this says 1: the driver
 * may have added an entry after our look and before it could see the
 * re-enable, and it will not kick for that one.
 */
int pyl_vq_set_notification(struct pyl_vq *vq, int enabled)
{
	int pending;

	vq->notify_enabled = enabled;
	if (vq->event_idx) {
		if (enabled)
			WRITE_ONCE(*vq->avail_event, vq->last_avail_idx);
	} else {
		uint16_t flags = READ_ONCE(vq->used[0]);

		if (enabled)
			flags &= ~VRING_USED_F_NO_NOTIFY;
		else
			flags |= VRING_USED_F_NO_NOTIFY;
		WRITE_ONCE(vq->used[0], flags);
	}
	if (enabled)
		/*
		 * Our store must be visible before we read avail.idx: the
		 * mirror of the driver's "write idx, barrier, read flags".
		 */
		full_barrier();
	pending = pyl_vq_pending(vq);
	return pending < 0 ? -1 : pending > 0;
}

/*
 * pop(), keeping kicks off while there is work and on when there is none,
 * so a backend can drain the ring and then sleep on its kick eventfd
 * without losing a request (the race set_notification describes).
 */
int pyl_vq_pop_with_notify(struct pyl_vq *vq, struct pyl_chain *chain)
{
	int got = pyl_vq_pop(vq, chain);

	if (got == 0) {
		if (vq->before_enable)
			vq->before_enable(vq->before_enable_data);
		got = pyl_vq_set_notification(vq, 1);
		if (got <= 0)
			return got;
		got = pyl_vq_pop(vq, chain);
	}
	if (got == 1 && vq->notify_enabled)
		pyl_vq_set_notification(vq, 0);
	return got;
}

/*
 * Take the chain pyl_vq_peek() found, as pyl_vq_pop_with_notify() would
 * have: kicks off while there is work.
 */
void pyl_vq_consume(struct pyl_vq *vq)
{
	vq->last_avail_idx++;
	if (vq->notify_enabled)
		pyl_vq_set_notification(vq, 0);
}

/*
 * Copy `len` bytes of the chain's readable part from `offset` out to
 * dst; returns how many there were.  For headers, which a driver may
 * split over any number of buffers (2.7.4.1).
 */
uint64_t pyl_chain_copy_out(const struct pyl_chain *chain, uint64_t offset,
			    uint8_t *dst, uint64_t len)
{
	uint64_t done = 0;
	uint32_t i;

	for (i = 0; i < chain->nreadable && done < len; i++) {
		const struct pyl_buffer *b = &chain->bufs[i];
		uint64_t n;

		if (offset >= b->len) {
			offset -= b->len;
			continue;
		}
		n = b->len - offset;
		if (n > len - done)
			n = len - done;
		memcpy(dst + done, b->host + offset, n);
		done += n;
		offset = 0;
	}
	return done;
}

/* Copy src into the chain's writable part from `offset`; the count. */
uint64_t pyl_chain_copy_in(const struct pyl_chain *chain, uint64_t offset,
			   const uint8_t *src, uint64_t len)
{
	const struct pyl_buffer *w = chain->bufs + chain->nreadable;
	uint64_t done = 0;
	uint32_t i;

	for (i = 0; i < chain->nwritable && done < len; i++) {
		uint64_t n;

		if (offset >= w[i].len) {
			offset -= w[i].len;
			continue;
		}
		n = w[i].len - offset;
		if (n > len - done)
			n = len - done;
		memcpy(w[i].host + offset, src + done, n);
		done += n;
		offset = 0;
	}
	return done;
}
