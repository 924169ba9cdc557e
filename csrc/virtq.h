/*
 * The split ring's C-only parts: what blk.c and net.c use of virtq.c
 * beyond the boundary (pylguest.h, where everything Python calls is).
 */
#ifndef PYL_VIRTQ_H
#define PYL_VIRTQ_H

#include "pylguest.h"

/*
 * The ring's structures (pylguest.h) are views of guest memory, laid out
 * by the guest: every field is the guest's to change
 * at any moment, so each is read once, with READ_ONCE, into a local, and
 * then checked; our stores are WRITE_ONCE, so the compiler neither tears,
 * repeats nor drops them.
 */
#define READ_ONCE(x)		__atomic_load_n(&(x), __ATOMIC_RELAXED)
#define WRITE_ONCE(x, v)	__atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

int pyl_vq_peek(struct pyl_vq *vq, struct pyl_chain *chain);
void pyl_vq_consume(struct pyl_vq *vq);
uint8_t *pyl_guest_range(const struct pyl_memory *memory, uint64_t gpa,
			 uint64_t len);
uint64_t pyl_chain_copy_out(const struct pyl_chain *chain, uint64_t offset,
			    uint8_t *dst, uint64_t len);
uint64_t pyl_chain_copy_in(const struct pyl_chain *chain, uint64_t offset,
			   const uint8_t *src, uint64_t len);

#endif
