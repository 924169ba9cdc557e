/*
 * virtqueue.c: the guest side of a split ring, one step at a time.
 *
 * Memory ordering. The device is the launcher, a thread on another host
 * CPU, reading and writing the ring while we do. Three orderings matter:
 *
 *  1. We fill descriptors and the avail ring entry, *then* bump
 *     avail->idx: the device must never see an index that covers a stale
 *     entry. Store after store.
 *  2. We read used->idx, *then* the used entry it covers. Load after load.
 *  3. We bump avail->idx (or write used_event), *then* read whether the
 *     device wants a kick (or check used->idx once more). Store, then load.
 *
 * x86 keeps stores in order with stores and loads with loads (its TSO
 * model), so for 1 and 2 a compiler barrier is enough: it only stops gcc
 * from reordering our C. But x86 *may* let a load pass an earlier store
 * (the store waits in the store buffer), so 3 needs a real fence, as
 * Linux's virtio_mb() is; without it we could read a stale "no kick
 * needed" while the device reads our stale avail->idx, and both sleep.
 * We use `lock addl $0,(%rsp)`, which Linux's smp_mb() also uses on
 * x86-64: any locked instruction is a full barrier, and the instruction
 * emulator knows it (it does not know mfence).
 *
 * Everything the device writes is read through volatile pointers, once:
 * it can change under us at any moment.
 */
#include "hypercall.h"
#include "io.h"
#include "printf.h"
#include "timer.h"
#include "virtqueue.h"

_Static_assert(sizeof(struct vring_desc) == 16, "");
_Static_assert(sizeof(struct vring_avail) == 4, "");
_Static_assert(sizeof(struct vring_used_elem) == 8, "");
_Static_assert(sizeof(struct vring_used) == 4, "");

#define barrier()	asm volatile("" : : : "memory")

static inline void full_barrier(void)
{
	asm volatile("lock addl $0, (%%rsp)" : : : "memory", "cc");
}

#define READ_ONCE(x)		(*(const volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v)	(*(volatile typeof(x) *)&(x) = (v))

static u64 align_up(u64 value, u64 align)
{
	return (value + align - 1) & ~(align - 1);
}

/* The used ring starts on the first VRING_ALIGN boundary after the
 * descriptor table and the avail ring (with its used_event). */
static u64 used_offset(unsigned int num)
{
	return align_up(16 * num + 2 * (3 + num), VRING_ALIGN);
}

u64 vring_size(unsigned int num)
{
	return used_offset(num) + 2 * 3 + 8 * num;
}

/*
 * The spec's vring_need_event(): has the index moved from old to new_idx
 * past the point event_idx the other side asked about? All u16 and
 * wrapping: "event_idx is in the window (old, new_idx]".
 */
static bool need_event(u16 event_idx, u16 new_idx, u16 old)
{
	return (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old);
}

static void zero(void *p, u64 n)
{
	u64 *q = p;			/* the ring is page aligned */

	for (n /= 8; n; n--)
		*q++ = 0;
}

bool vq_init(struct virtqueue *vq, const char *name, unsigned int num,
	     u32 pfn, bool event_idx, bool indirect)
{
	u8 *ring = (u8 *)((u64)pfn << 12);
	unsigned int i;

	if (num == 0 || num > VQ_MAX_NUM || (num & (num - 1))) {
		printf("virtqueue %s: %u entries: not a power of two up to %u\n",
		       name, num, VQ_MAX_NUM);
		return false;
	}

	/* Start from nothing: after a reset the ring is ours to rewrite, and
	 * both sides count from index 0 again. */
	zero(ring, align_up(vring_size(num), 8));

	*vq = (struct virtqueue){
		.name = name,
		.num = num,
		.ring_gpa = (u64)pfn << 12,
		.event_idx = event_idx,
		.indirect = indirect,
		.desc = (struct vring_desc *)ring,
		.avail = (struct vring_avail *)(ring + 16 * num),
		.used = (struct vring_used *)(ring + used_offset(num)),
		.num_free = num,
		.interrupts = true,
	};
	vq->used_event = &vq->avail->ring[num];
	vq->avail_event = (u16 *)&vq->used->ring[num];

	/* Every descriptor is free, in a list 0 -> 1 -> ... -> num-1. */
	for (i = 0; i < num; i++) {
		vq->next_free[i] = i + 1;
		vq->indirect_of[i] = -1;
	}
	return true;
}

/* --- Adding a request. */

static void set_desc(struct vring_desc *d, const struct vq_seg *seg,
		     u16 flags)
{
	d->addr = (u64)seg->addr;	/* identity mapped: pointer = address */
	d->len = seg->len;
	d->flags = flags;
}

/* The i-th segment of the request, counting the out ones first. */
static const struct vq_seg *segment(const struct vq_seg *out,
				    unsigned int n_out,
				    const struct vq_seg *in, unsigned int i)
{
	return i < n_out ? &out[i] : &in[i - n_out];
}

static int free_table(struct virtqueue *vq)
{
	int t;

	for (t = 0; t < VQ_INDIRECT_TABLES; t++)
		if (!vq->indirect_busy[t])
			return t;
	return -1;
}

/*
 * An indirect request: the whole chain goes in one of our tables, which
 * the device walks from its entry 0, and the ring gets one descriptor
 * with VRING_DESC_F_INDIRECT pointing at the table. (The spec forbids
 * WRITE and NEXT on that one: the table's own entries say which is which.)
 */
static void fill_indirect(struct virtqueue *vq, u16 head,
			  struct vring_desc *table, int t,
			  const struct vq_seg *out, unsigned int n_out,
			  const struct vq_seg *in, unsigned int n_in)
{
	unsigned int total = n_out + n_in, i;

	for (i = 0; i < total; i++) {
		u16 flags = i >= n_out ? VRING_DESC_F_WRITE : 0;

		if (i + 1 < total)
			flags |= VRING_DESC_F_NEXT;
		set_desc(&table[i], segment(out, n_out, in, i), flags);
		table[i].next = i + 1;
	}
	vq->desc[head] = (struct vring_desc){
		.addr = (u64)table,
		.len = total * sizeof(*table),
		.flags = VRING_DESC_F_INDIRECT,
	};
	if (t >= 0)			/* one of ours, not the caller's */
		vq->indirect_busy[t] = true;
	vq->indirect_of[head] = t;
	vq->chain_len[head] = 1;
	vq->chain_tail[head] = head;
}

/* A direct request: one ring descriptor per segment, taken off the free
 * list in order and linked by `next`. Returns the last one used. */
static u16 fill_direct(struct virtqueue *vq, u16 head,
		       const struct vq_seg *out, unsigned int n_out,
		       const struct vq_seg *in, unsigned int n_in)
{
	unsigned int total = n_out + n_in, i;
	u16 d = head, last = head;

	for (i = 0; i < total; i++) {
		u16 flags = i >= n_out ? VRING_DESC_F_WRITE : 0;

		if (i + 1 < total)
			flags |= VRING_DESC_F_NEXT;
		set_desc(&vq->desc[d], segment(out, n_out, in, i), flags);
		vq->desc[d].next = vq->next_free[d];
		last = d;
		d = vq->next_free[d];
	}
	vq->chain_len[head] = total;
	vq->chain_tail[head] = last;
	return last;
}

/* The chain at `head` is built: count it, and offer it to the device. */
static int offer(struct virtqueue *vq, u16 head, void *token)
{
	vq->num_free -= vq->chain_len[head];
	vq->token[head] = token;

	/* Offer the head: the entry first, then the index that covers it
	 * (ordering 1 above: store after store, a compiler barrier). */
	vq->avail->ring[vq->avail_idx & (vq->num - 1)] = head;
	barrier();
	vq->avail_idx++;
	WRITE_ONCE(vq->avail->idx, vq->avail_idx);
	return head;
}

int vq_add(struct virtqueue *vq, const struct vq_seg *out, unsigned int n_out,
	   const struct vq_seg *in, unsigned int n_in, void *token,
	   bool use_indirect)
{
	unsigned int total = n_out + n_in;
	u16 head = vq->free_head;
	int t = -1;

	if (vq->broken || total == 0 || !token)
		return -1;
	if (use_indirect && vq->indirect && total <= VQ_INDIRECT_MAX)
		t = free_table(vq);	/* none free: fall back to direct */
	if (vq->num_free < (t >= 0 ? 1 : total))
		return -1;

	if (t >= 0) {
		fill_indirect(vq, head, vq->indirect_table[t], t, out, n_out,
			      in, n_in);
		vq->free_head = vq->next_free[head];
	} else {
		u16 last = fill_direct(vq, head, out, n_out, in, n_in);

		vq->free_head = vq->next_free[last];
	}
	return offer(vq, head, token);
}

int vq_add_in_table(struct virtqueue *vq, struct vring_desc *table,
		    const struct vq_seg *out, unsigned int n_out,
		    const struct vq_seg *in, unsigned int n_in, void *token)
{
	u16 head = vq->free_head;

	if (vq->broken || !vq->indirect || n_out + n_in == 0 || !token ||
	    vq->num_free < 1)
		return -1;
	fill_indirect(vq, head, table, -1, out, n_out, in, n_in);
	vq->free_head = vq->next_free[head];
	return offer(vq, head, token);
}

/* --- Telling the device. */

void vq_kick(struct virtqueue *vq)
{
	u16 old = vq->kicked_idx, new_idx = vq->avail_idx;
	bool needed;

	vq->kicked_idx = new_idx;
	/* Ordering 3: our avail->idx must be visible before we read what
	 * the device asked for, or we may both wait for the other. */
	full_barrier();
	if (vq->event_idx)
		needed = need_event(READ_ONCE(*vq->avail_event), new_idx, old);
	else
		needed = !(READ_ONCE(vq->used->flags) & VRING_USED_F_NO_NOTIFY);

	if (!needed) {
		vq->kicks_suppressed++;
		return;
	}
	/* The seed's lg_notify(): LHCALL_NOTIFY with the ring's address.
	 * The launcher matches this exact store with an ioeventfd, so the
	 * kick wakes the queue's worker without an exit to userspace. */
	vq->kicks++;
	lhcall_notify(vq->ring_gpa);
}

/* --- Taking finished requests back. */

bool vq_has_used(const struct virtqueue *vq)
{
	return READ_ONCE(vq->used->idx) != vq->last_used_idx;
}

/* Put a finished chain back on the free list. Only our own records are
 * used here, never the descriptors the device could have scribbled on. */
static void free_chain(struct virtqueue *vq, u16 head)
{
	if (vq->indirect_of[head] >= 0) {
		vq->indirect_busy[vq->indirect_of[head]] = false;
		vq->indirect_of[head] = -1;
	}
	vq->next_free[vq->chain_tail[head]] = vq->free_head;
	vq->free_head = head;
	vq->num_free += vq->chain_len[head];
	vq->token[head] = NULL;
}

void *vq_get_used(struct virtqueue *vq, u32 *len)
{
	struct vring_used_elem *e;
	u32 id;
	void *token;

	if (vq->broken || !vq_has_used(vq))
		return NULL;
	/* Ordering 2: the index first, then the entry it covers. */
	barrier();
	e = &vq->used->ring[vq->last_used_idx & (vq->num - 1)];
	id = READ_ONCE(e->id);
	if (len)
		*len = READ_ONCE(e->len);

	/* The device must give back a head we gave it, and only once. */
	if (id >= vq->num || !vq->token[id]) {
		printf("virtqueue %s: the device gave back id %u, "
		       "which is not a request in flight\n", vq->name, id);
		vq->broken = true;
		return NULL;
	}
	token = vq->token[id];
	free_chain(vq, id);
	vq->last_used_idx++;

	/* With EVENT_IDX, "interrupt me" means "when used->idx passes
	 * what I have consumed": move the mark along (ordering 3 again:
	 * the caller checks used->idx next, before it sleeps). */
	if (vq->event_idx && vq->interrupts) {
		WRITE_ONCE(*vq->used_event, vq->last_used_idx);
		full_barrier();
	}
	return token;
}

/* --- Interrupts. */

void vq_disable_interrupts(struct virtqueue *vq)
{
	vq->interrupts = false;
	/* Without EVENT_IDX the device honours the flag. With it, the device
	 * only looks at used_event: put the mark just behind us, where
	 * used->idx will not reach it again until it wraps (65535 more). */
	WRITE_ONCE(vq->avail->flags,
		   vq->avail->flags | VRING_AVAIL_F_NO_INTERRUPT);
	if (vq->event_idx)
		WRITE_ONCE(*vq->used_event, (u16)(vq->last_used_idx - 1));
}

bool vq_enable_interrupts(struct virtqueue *vq)
{
	vq->interrupts = true;
	WRITE_ONCE(vq->avail->flags,
		   vq->avail->flags & ~VRING_AVAIL_F_NO_INTERRUPT);
	if (vq->event_idx)
		WRITE_ONCE(*vq->used_event, vq->last_used_idx);
	/* Ordering 3: what the device finished before it saw our request
	 * raised no interrupt; look for it now. */
	full_barrier();
	return vq_has_used(vq);
}

bool vq_wait(struct virtqueue *vq, unsigned int timeout_ms)
{
	u64 start = timer_ms();

	/*
	 * Look with interrupts off, then sleep with sti_hlt(): an interrupt
	 * that arrives after the look still wakes the hlt. Whatever wakes
	 * us (this queue's IRQ, the timer tick, anything), look again.
	 */
	for (;;) {
		cli();
		if (vq_has_used(vq) || vq->broken)
			break;
		if (timeout_ms && timer_ms() - start >= timeout_ms)
			break;
		sti_hlt();
	}
	sti();
	return vq_has_used(vq) && !vq->broken;
}
