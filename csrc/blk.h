/* The virtio block request loop (blk.c): what Python gives it, what it says. */
#ifndef PYL_BLK_H
#define PYL_BLK_H

#include <stdint.h>

#include "virtq.h"

#define PYL_BLK_ID_BYTES	20
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

#endif
