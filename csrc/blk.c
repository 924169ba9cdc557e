// SPDX-License-Identifier: GPL-2.0
/*
 * The virtio block request loop: pop a chain, parse the request, move its
 * data between the image file and guest memory, write the status byte,
 * push; until the ring is empty.  Python calls pyl_blk_drain() once per
 * kick with the GIL released, and decides on the interrupt once for the
 * whole batch.
 *
 * A request (virtio 5.2.6) is a readable 16-byte header
 * {u32 type; u32 ioprio; u64 sector}, then data buffers (readable for a
 * write, writable for a read), then one writable status byte.  As in the
 * ring walk, the request is first parsed, every length and the sector
 * range checked, and only then carried out.
 *
 * Never lose data: a write the guest sees complete has been handed to the
 * file (pwritev returned every byte), FLUSH means fdatasync, and a
 * read-only image answers every write with IOERR.
 *
 * One request may move up to 4 GiB.  It moves in system calls of at most
 * PYL_BLK_IO_CHUNK bytes and IOV_MAX buffers, and between them we look at
 * *abandon: once a reset or the end of the run has set it, the request
 * stops where it is and is never pushed, so the guest never sees it
 * complete and nobody waits for the rest of it.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

#include "blk.h"

#define SECTOR_SIZE		512
#define HEADER_SIZE		16
#define BLK_IOV_MAX		1024	/* Linux's UIO_MAXIOV */

#define VIRTIO_BLK_T_IN		0
#define VIRTIO_BLK_T_OUT	1
#define VIRTIO_BLK_T_FLUSH	4
#define VIRTIO_BLK_T_GET_ID	8
#define VIRTIO_BLK_S_OK		0
#define VIRTIO_BLK_S_IOERR	1
#define VIRTIO_BLK_S_UNSUPP	2

/* Bytes [start, start + len) of a run of buffers, walked in pieces. */
struct span {
	const struct pyl_buffer *buf;
	uint32_t count;
	uint64_t skip;		/* bytes of buf[0] before the span starts */
	uint64_t len;
};

/* A parsed request: nothing here came unchecked from the guest. */
struct request {
	uint32_t type;
	uint64_t sector;
	struct span data;
	uint8_t *status;	/* the one status byte */
};

/* The span of `len` bytes from `offset` into a run of buffers. */
static struct span span_at(const struct pyl_buffer *buf, uint32_t count,
			   uint64_t offset, uint64_t len)
{
	while (count && offset >= buf->len) {
		offset -= buf->len;
		buf++;
		count--;
	}
	return (struct span){ buf, count, offset, len };
}

static inline int abandoned(const struct pyl_blk *blk)
{
	return blk->abandon && *blk->abandon;
}

/*
 * Every check of the request in `chain`, in one place.  Returns 0, or the
 * rule of a request we cannot answer: with no status byte there is
 * nowhere to say IOERR, and one with no whole header does not say what
 * it asks.
 */
static int parse(const struct pyl_chain *chain, struct request *req)
{
	const struct pyl_buffer *readable = chain->bufs;
	const struct pyl_buffer *writable = chain->bufs + chain->nreadable;
	const struct pyl_buffer *last;
	uint8_t header[HEADER_SIZE];

	/* The ring's rules (2.7.4.2) put every writable byte after every
	 * readable one, so the last writable byte is the last of all. */
	if (chain->writable_len < 1)
		return PYL_BLK_RULE_STATUS;
	last = &writable[chain->nwritable - 1];
	req->status = last->host + last->len - 1;

	/* The header may be split over several buffers: a device must not
	 * assume how a request is laid out in descriptors (2.7.4.1). */
	if (chain->readable_len < HEADER_SIZE)
		return PYL_BLK_RULE_HEADER;
	pyl_chain_copy_out(chain, 0, header, HEADER_SIZE);
	memcpy(&req->type, header, 4);
	memcpy(&req->sector, header + 8, 8);

	/* Which part is the data follows from the type (5.2.6): a write's
	 * comes after the header, readable; every other type's is the
	 * writable room before the status byte. */
	if (req->type == VIRTIO_BLK_T_OUT) {
		req->data = span_at(readable, chain->nreadable, HEADER_SIZE,
				    chain->readable_len - HEADER_SIZE);
	} else {
		req->data = span_at(writable, chain->nwritable, 0,
				    chain->writable_len - 1);
	}
	return 0;
}

/* The status of a request that is answered with no I/O, or -1. */
static int fault_status(const struct pyl_blk *blk, const struct request *req)
{
	uint64_t sectors;

	switch (req->type) {
	case VIRTIO_BLK_T_IN:
	case VIRTIO_BLK_T_OUT:
		break;
	case VIRTIO_BLK_T_FLUSH:
	case VIRTIO_BLK_T_GET_ID:
		return -1;
	default:
		return VIRTIO_BLK_S_UNSUPP;
	}
	/* 5.2.6.1: data in whole sectors, none beyond the capacity.  Written
	 * so that a sector near 2^64 cannot wrap round. */
	if (req->data.len % SECTOR_SIZE)
		return VIRTIO_BLK_S_IOERR;
	sectors = req->data.len / SECTOR_SIZE;
	if (req->sector > blk->capacity || sectors > blk->capacity - req->sector)
		return VIRTIO_BLK_S_IOERR;
	return -1;
}

/*
 * The next system call's worth of the span: at most PYL_BLK_IO_CHUNK
 * bytes and BLK_IOV_MAX buffers.  A buffer longer than what is left is
 * cut, and goes on in the next batch.  Returns the bytes in the batch.
 */
static uint64_t next_batch(struct span *s, struct iovec *iov, int *niov)
{
	uint64_t size = 0;

	*niov = 0;
	while (s->len && s->count && *niov < BLK_IOV_MAX &&
	       size < PYL_BLK_IO_CHUNK) {
		uint64_t n = s->buf->len - s->skip;

		if (n > s->len)
			n = s->len;
		if (n > PYL_BLK_IO_CHUNK - size)
			n = PYL_BLK_IO_CHUNK - size;
		iov[*niov].iov_base = s->buf->host + s->skip;
		iov[*niov].iov_len = n;
		(*niov)++;
		size += n;
		s->len -= n;
		s->skip += n;
		if (s->skip == s->buf->len) {
			s->buf++;
			s->count--;
			s->skip = 0;
		}
	}
	return size;
}

/* One batch: preadv/pwritev until every byte moved, EOF, or an error. */
static uint64_t move_batch(struct pyl_blk *blk, int write, struct iovec *iov,
			   int niov, uint64_t size, uint64_t offset)
{
	uint64_t done = 0;

	if (size > blk->largest_syscall)
		blk->largest_syscall = size;
	while (niov) {
		ssize_t n;

		blk->syscalls++;
		n = write ? pwritev(blk->fd, iov, niov, offset + done)
			  : preadv(blk->fd, iov, niov, offset + done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		done += n;
		/* A short transfer: go on from where it stopped. */
		while (niov && (size_t)n >= iov->iov_len) {
			n -= iov->iov_len;
			iov++;
			niov--;
		}
		if (niov && n) {
			iov->iov_base = (uint8_t *)iov->iov_base + n;
			iov->iov_len -= n;
		}
	}
	return done;
}

/*
 * Move the request's data, batch by batch; the bytes moved, or -1 if a
 * reset or stop abandoned the request between two batches.
 */
static int64_t transfer(struct pyl_blk *blk, struct request *req, int write)
{
	struct iovec iov[BLK_IOV_MAX];
	uint64_t offset = req->sector * SECTOR_SIZE, done = 0;
	struct span s = req->data;
	int niov;

	for (;;) {
		uint64_t size = next_batch(&s, iov, &niov), moved;

		if (size == 0)
			return done;
		if (abandoned(blk))
			return -1;
		moved = move_batch(blk, write, iov, niov, size, offset + done);
		done += moved;
		if (moved < size)
			return done;	/* EOF or an error: the rest fails too */
	}
}

/* Copy the device's id into the data part, as much as fits. */
static uint64_t get_id(struct pyl_blk *blk, struct request *req)
{
	uint64_t done = 0;

	while (done < PYL_BLK_ID_BYTES && req->data.count && req->data.len) {
		uint64_t n = req->data.buf->len - req->data.skip;

		if (n > PYL_BLK_ID_BYTES - done)
			n = PYL_BLK_ID_BYTES - done;
		if (n > req->data.len)
			n = req->data.len;
		memcpy(req->data.buf->host + req->data.skip, blk->id + done, n);
		done += n;
		req->data.len -= n;
		req->data.buf++;
		req->data.count--;
		req->data.skip = 0;
	}
	return done;
}

/*
 * Do what a parsed request asks: its status, the bytes written into the
 * guest's buffers in *written; -1 if it was abandoned.
 */
static int execute(struct pyl_blk *blk, struct request *req,
		   uint64_t *written)
{
	int status = fault_status(blk, req);
	int64_t done;

	*written = 0;
	if (status >= 0)
		return status;
	switch (req->type) {
	case VIRTIO_BLK_T_IN:
		done = transfer(blk, req, 0);
		if (done < 0)
			return -1;
		*written = done;
		return (uint64_t)done == req->data.len ? VIRTIO_BLK_S_OK
						       : VIRTIO_BLK_S_IOERR;
	case VIRTIO_BLK_T_OUT:
		if (blk->read_only)	/* 5.2.6.2: IOERR, no data written */
			return VIRTIO_BLK_S_IOERR;
		done = transfer(blk, req, 1);
		if (done < 0)
			return -1;
		return (uint64_t)done == req->data.len ? VIRTIO_BLK_S_OK
						       : VIRTIO_BLK_S_IOERR;
	case VIRTIO_BLK_T_FLUSH:
		if (blk->read_only)
			return VIRTIO_BLK_S_OK;
		blk->flushes++;
		return fdatasync(blk->fd) ? VIRTIO_BLK_S_IOERR
					  : VIRTIO_BLK_S_OK;
	default:			/* GET_ID, the last one parse lets by */
		*written = get_id(blk, req);
		return VIRTIO_BLK_S_OK;
	}
}

/*
 * Serve the ring until it is empty, `limit` requests were pushed (0: no
 * limit), a rule is broken, or the request in flight is abandoned.
 */
int pyl_blk_drain(struct pyl_vq *vq, struct pyl_chain *chain,
		  struct pyl_blk *blk, uint32_t limit,
		  struct pyl_blk_outcome *out)
{
	memset(out, 0, sizeof(*out));
	for (;;) {
		struct request req;
		uint64_t written;
		int got, status;

		if (limit && out->pushed == limit)
			return out->stop = PYL_BLK_LIMIT;
		got = pyl_vq_pop_with_notify(vq, chain);
		if (got < 0)
			return out->stop = PYL_BLK_RING_FAULT;
		if (got == 0)
			return out->stop = PYL_BLK_EMPTY;
		if (abandoned(blk))
			return out->stop = PYL_BLK_ABANDONED;
		out->rule = parse(chain, &req);
		if (out->rule) {
			out->head = chain->head;
			out->readable_len = chain->readable_len;
			return out->stop = PYL_BLK_REQUEST_FAULT;
		}
		status = execute(blk, &req, &written);
		if (status < 0)
			return out->stop = PYL_BLK_ABANDONED;
		*req.status = status;
		pyl_vq_push(vq, chain->head, written + 1);
		blk->requests++;
		out->pushed++;
		out->last = (struct pyl_blk_request){ req.type, req.sector,
						      req.data.len, status };
	}
}
