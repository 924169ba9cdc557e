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
#define _GNU_SOURCE		/* O_DIRECT, preadv2 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

#include <liburing.h>

#include "virtq.h"

#define SECTOR_SIZE		PYL_BLK_SECTOR_SIZE	/* pylguest.h: Python's too */
#define HEADER_SIZE		PYL_BLK_HEADER_SIZE

/*
 * The request types (VIRTIO_BLK_T_IN, _OUT, _FLUSH, _GET_ID) and statuses
 * (VIRTIO_BLK_S_OK, _IOERR, _UNSUPP) are the kernel's <linux/virtio_blk.h>,
 * through pylguest.h; Python reads the same ones.
 */

/* Bytes [start, start + len) of a run of buffers, walked in pieces. */
struct span {
	const struct pyl_buffer *buf;
	uint32_t count;
	uint64_t skip;		/* bytes of buf[0] before the span starts */
	uint64_t len;
};

/*
 * A parsed request, validated once (parse()), as Firecracker's
 * Request::parse does: where the chain puts the header, data and status
 * byte, and the verdict on what the header asks.  Nothing is looked at
 * again, and nothing else decides whether the request moves data.
 */
struct request {
	uint32_t type;
	uint64_t sector;
	struct span data;
	uint8_t *status;	/* the one status byte */
	int verdict;		/* the status to answer with no I/O, or -1: do it */
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
	return blk->abandon && READ_ONCE(*blk->abandon);
}

/*
 * The status of a request that is answered with no I/O (UNSUPP for a
 * type this device does not serve, IOERR for data not in whole sectors or
 * beyond the capacity), or -1: a request to do.
 */
static int verdict(const struct pyl_blk *blk, const struct request *req)
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
	/*
	 * 5.2.6.1: data in whole sectors, none beyond the capacity.  Written
	 * so that a sector near 2^64 cannot wrap round.
	 */
	if (req->data.len % SECTOR_SIZE)
		return VIRTIO_BLK_S_IOERR;
	sectors = req->data.len / SECTOR_SIZE;
	if (req->sector > blk->capacity || sectors > blk->capacity - req->sector)
		return VIRTIO_BLK_S_IOERR;
	return -1;
}

/*
 * Every check of the request in `chain`, in one place.  Returns 0, with
 * req->verdict saying what is to be done, or the rule of a request we
 * cannot answer: with no status byte there is nowhere to say IOERR, and
 * one with no whole header does not say what it asks.
 */
static int parse(const struct pyl_blk *blk, const struct pyl_chain *chain,
		 struct request *req)
{
	const struct pyl_buffer *readable = chain->bufs;
	const struct pyl_buffer *writable = chain->bufs + chain->nreadable;
	const struct pyl_buffer *last;
	uint8_t header[HEADER_SIZE];

	/*
	 * The ring's rules (2.7.4.2) put every writable byte after every
	 * readable one, so the last writable byte is the last of all.
	 */
	if (chain->writable_len < 1)
		return PYL_BLK_RULE_STATUS;
	last = &writable[chain->nwritable - 1];
	req->status = last->host + last->len - 1;

	/*
	 * The header may be split over several buffers: a device must not
	 * assume how a request is laid out in descriptors (2.7.4.1).
	 */
	if (chain->readable_len < HEADER_SIZE)
		return PYL_BLK_RULE_HEADER;
	pyl_chain_copy_out(chain, 0, header, HEADER_SIZE);
	memcpy(&req->type, header, 4);
	memcpy(&req->sector, header + 8, 8);

	/*
	 * Which part is the data follows from the type (5.2.6): a write's
	 * comes after the header, readable; every other type's is the
	 * writable room before the status byte.
	 */
	if (req->type == VIRTIO_BLK_T_OUT) {
		req->data = span_at(readable, chain->nreadable, HEADER_SIZE,
				    chain->readable_len - HEADER_SIZE);
	} else {
		req->data = span_at(writable, chain->nwritable, 0,
				    chain->writable_len - 1);
	}
	req->verdict = verdict(blk, req);
	return 0;
}


/*
 * The next system call's worth of the span: at most PYL_BLK_IO_CHUNK
 * bytes and max_iov buffers.  A buffer longer than what is left is
 * cut, and goes on in the next batch.  Returns the bytes in the batch.
 */
static uint64_t next_batch(struct span *s, struct iovec *iov, int max_iov,
			   int *niov)
{
	uint64_t size = 0;

	*niov = 0;
	while (s->len && s->count && *niov < max_iov &&
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

/* Skip the first n bytes of a span. */
static void span_advance(struct span *s, uint64_t n)
{
	s->len -= n;
	n += s->skip;
	while (s->count && n >= s->buf->len) {
		n -= s->buf->len;
		s->buf++;
		s->count--;
	}
	s->skip = n;
}

/*
 * Move the request's data from byte `from` on, batch by batch: the bytes
 * moved in all, or -1 if a reset or stop abandoned the request between
 * two batches.
 */
static int64_t transfer(struct pyl_blk *blk, const struct request *req,
			int write, uint64_t from)
{
	struct iovec iov[PYL_BLK_IOV_MAX];
	uint64_t offset = req->sector * SECTOR_SIZE, done = from;
	struct span s = req->data;
	int niov;

	span_advance(&s, from);
	for (;;) {
		uint64_t size = next_batch(&s, iov, PYL_BLK_IOV_MAX, &niov), moved;

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
	int64_t done;

	*written = 0;
	if (req->verdict >= 0)
		return req->verdict;
	switch (req->type) {
	case VIRTIO_BLK_T_IN:
		done = transfer(blk, req, 0, 0);
		if (done < 0)
			return -1;
		*written = done;
		return (uint64_t)done == req->data.len ? VIRTIO_BLK_S_OK
						       : VIRTIO_BLK_S_IOERR;
	case VIRTIO_BLK_T_OUT:
		if (blk->read_only)	/* 5.2.6.2: IOERR, no data written */
			return VIRTIO_BLK_S_IOERR;
		done = transfer(blk, req, 1, 0);
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
 * Requests in flight together.
 *
 * A disk does several things at once (a real one, or the host's page
 * cache on several CPUs), and the guest may have many requests queued, so
 * reads and writes that wait for the disk, and fit in one system call, go
 * to io_uring and are in flight together, up to DEPTH of them; what the
 * page cache has is done at once (try_at_once, and writes to a file that
 * is not O_DIRECT).  Each taken request has a slot;
 * slots are used, and their requests published in the used ring, in the
 * order the guest made them: a completion that comes early waits for
 * those before it.  (The spec would let us publish out of order; doing it
 * in order costs a little latency and keeps what the guest sees
 * deterministic, which the ring fuzzer's model relies on.)  Anything else
 * -- a fault, GET_ID, a request too big for one call, every request when
 * io_uring is not available -- is done at once, in its slot.  A flush
 * first waits for every request in flight: "the writes before it" must be
 * written before fdatasync can make them durable; and so does a request
 * that shares bytes with one in flight (the hazards, below).
 */
#define DEPTH		32	/* requests in flight at most */
#define SLOT_IOVS	64	/* buffers of one request sent to io_uring */

struct slot {
	/*
	 * The request as parsed; req.data points into the chain buffer, which
	 * the next pop reuses: once submitted, only iov[] says where the
	 * data is.
	 */
	struct request req;
	uint16_t head;
	int done;		/* its status is known, and written */
	uint8_t status;
	uint64_t written;	/* bytes written into the guest's buffers */
	int write;		/* OUT: the device reads guest memory */
	uint64_t size;		/* for io_uring: the bytes its one call moves */
	int niov;
	struct iovec iov[SLOT_IOVS];
};

struct pyl_blk_inflight {
	struct io_uring ring;
	int have_ring;		/* io_uring_queue_init worked */
	uint32_t first;		/* the oldest slot not yet published */
	uint32_t count;		/* slots taken and not yet published */
	uint32_t submitted;	/* io_uring requests not yet completed */
	int error;		/* the errno io_uring failed with, once it has */
	struct slot slot[DEPTH];
};

/*
 * How waiting for io_uring can end early: a reset or stop is waiting, or
 * the ring itself failed (a hard error, not "nothing yet"), after which
 * nothing in flight can be reaped and the device stops.
 */
#define REAP_ABANDONED		(-1)
#define REAP_RING_FAILED	(-2)

static int stop_for(int reaped)
{
	return reaped == REAP_RING_FAILED ? PYL_BLK_HOST_FAULT : PYL_BLK_ABANDONED;
}

/* Once, when the device opens its image; 1 with io_uring, 0 without. */
int pyl_blk_open(struct pyl_blk *blk, int use_io_uring)
{
	struct pyl_blk_inflight *f = calloc(1, sizeof(*f));

	if (!f)
		return -ENOMEM;
	if (use_io_uring && io_uring_queue_init(DEPTH, &f->ring, 0) == 0)
		f->have_ring = 1;
	blk->direct = (fcntl(blk->fd, F_GETFL) & O_DIRECT) != 0;
	blk->inflight = f;
	return f->have_ring;
}

void pyl_blk_close(struct pyl_blk *blk)
{
	struct pyl_blk_inflight *f = blk->inflight;

	if (!f)
		return;
	if (f->have_ring)
		io_uring_queue_exit(&f->ring);
	free(f);
	blk->inflight = NULL;
}

/*
 * The request's status is known: the status byte is written now, in the
 * order requests finish, as a device doing them one by one would.
 */
static void finish(struct slot *slot, int status, uint64_t written)
{
	*slot->req.status = status;
	slot->status = status;
	slot->written = written;
	slot->done = 1;
}

/*
 * From the page cache a read is done at once, and io_uring's round trip
 * would only cost time: so on a file that is not O_DIRECT we first ask
 * for it without waiting (RWF_NOWAIT), and only a read that would wait
 * for the disk goes to io_uring.  1 if it was done.
 */
static int try_at_once(struct pyl_blk *blk, struct slot *slot, int niov)
{
	uint64_t offset = slot->req.sector * SECTOR_SIZE;
	ssize_t n;

	blk->syscalls++;
	n = preadv2(blk->fd, slot->iov, niov, offset, RWF_NOWAIT);
	if (n < 0 || (uint64_t)n != slot->size)
		return 0;	/* it would block, or was short: the long way */
	finish(slot, VIRTIO_BLK_S_OK, n);
	return 1;
}

/*
 * Hand a read or write to io_uring, if it fits in one call: 1 if it
 * went, or was done at once; 0 if the caller must do it the slow way.
 */
static int submit(struct pyl_blk *blk, struct slot *slot, uint32_t index)
{
	struct pyl_blk_inflight *f = blk->inflight;
	struct span s = slot->req.data;
	struct io_uring_sqe *sqe;
	uint64_t offset = slot->req.sector * SECTOR_SIZE;
	int niov;

	/*
	 * A write to the page cache is a copy, done at once by pwritev (ext4
	 * refuses RWF_NOWAIT writes, and io_uring would hand them to a
	 * kernel thread, measured slower): the caller does it.
	 */
	if (!f->have_ring || (slot->write && !blk->direct))
		return 0;
	slot->size = next_batch(&s, slot->iov, SLOT_IOVS, &niov);
	if (s.len || slot->size == 0)
		return 0;	/* more than one call's worth, or nothing */
	slot->niov = niov;
	if (slot->size > blk->largest_syscall)
		blk->largest_syscall = slot->size;
	if (!blk->direct && try_at_once(blk, slot, niov))
		return 1;
	sqe = io_uring_get_sqe(&f->ring);
	if (!sqe)
		return 0;
	if (slot->write)
		io_uring_prep_writev(sqe, blk->fd, slot->iov, niov, offset);
	else
		io_uring_prep_readv(sqe, blk->fd, slot->iov, niov, offset);
	io_uring_sqe_set_data64(sqe, index);
	f->submitted++;
	if (f->submitted > blk->most_in_flight)
		blk->most_in_flight = f->submitted;
	blk->syscalls++;
	return 1;
}

/* The rest of a request io_uring did only `done` bytes of, by hand. */
static uint64_t finish_short(struct pyl_blk *blk, struct slot *slot,
			     uint64_t done)
{
	struct iovec *iov = slot->iov;
	int niov = slot->niov;
	uint64_t skip = done;

	while (niov && skip >= iov->iov_len) {
		skip -= iov->iov_len;
		iov++;
		niov--;
	}
	if (niov) {
		iov->iov_base = (uint8_t *)iov->iov_base + skip;
		iov->iov_len -= skip;
	}
	return move_batch(blk, slot->write, iov, niov, slot->size - done,
			  slot->req.sector * SECTOR_SIZE + done);
}

/* A request io_uring finished: a short one is finished by hand. */
static void completed(struct pyl_blk *blk, struct io_uring_cqe *cqe)
{
	struct pyl_blk_inflight *f = blk->inflight;
	struct slot *slot = &f->slot[io_uring_cqe_get_data64(cqe)];
	int64_t done = cqe->res;

	f->submitted--;
	if (done < 0)
		done = 0;	/* an error: IOERR, as for preadv's */
	else if ((uint64_t)done < slot->size && done > 0)
		done += finish_short(blk, slot, done);
	if ((uint64_t)done == slot->req.data.len)
		finish(slot, VIRTIO_BLK_S_OK, slot->write ? 0 : done);
	else
		finish(slot, VIRTIO_BLK_S_IOERR, slot->write ? 0 : done);
}

/*
 * Collect completions; with `wait`, until at least one came, waiting in
 * 50 ms slices so a reset or stop is seen.  -1 once one is.
 */
static int reap(struct pyl_blk *blk, int wait)
{
	struct pyl_blk_inflight *f = blk->inflight;
	struct __kernel_timespec slice = { .tv_nsec = 50 * 1000 * 1000 };
	struct io_uring_cqe *cqe;

	if (!f->have_ring)
		return 0;
	io_uring_submit(&f->ring);
	while (f->submitted) {
		int err = wait ? io_uring_wait_cqe_timeout(&f->ring, &cqe, &slice)
			       : io_uring_peek_cqe(&f->ring, &cqe);

		if (err == -ETIME || err == -EINTR) {
			if (abandoned(blk))
				return REAP_ABANDONED;
			continue;
		}
		if (err == -EAGAIN)
			return 0;	/* peeked: nothing completed yet */
		if (err) {
			/*
			 * Anything else will fail again at once: returning
			 * "nothing yet" here would have the caller spin.
			 */
			f->error = -err;
			return REAP_RING_FAILED;
		}
		completed(blk, cqe);
		io_uring_cqe_seen(&f->ring, cqe);
		wait = 0;
	}
	return 0;
}

/* Until nothing is in flight; or REAP_ABANDONED, or REAP_RING_FAILED. */
static int wait_all(struct pyl_blk *blk)
{
	int reaped;

	while (blk->inflight->submitted) {
		reaped = reap(blk, 1);
		if (reaped < 0)
			return reaped;
	}
	return 0;
}

/*
 * A reset or stop: wait for what io_uring still has (each at most one
 * call's worth: it writes into guest memory, so it must be over before
 * the guest gets its buffers back), and publish nothing.
 */
static void settle(struct pyl_blk *blk)
{
	struct pyl_blk_inflight *f = blk->inflight;
	struct io_uring_cqe *cqe;

	if (f->have_ring)
		io_uring_submit(&f->ring);
	while (f->submitted && io_uring_wait_cqe(&f->ring, &cqe) == 0) {
		f->submitted--;
		io_uring_cqe_seen(&f->ring, cqe);
	}
	f->first = f->count = 0;
}

/* Publish, in order, the requests at the front whose status is known. */
static void publish(struct pyl_vq *vq, struct pyl_blk *blk,
		    struct pyl_blk_outcome *out)
{
	struct pyl_blk_inflight *f = blk->inflight;

	while (f->count && f->slot[f->first].done) {
		struct slot *slot = &f->slot[f->first];

		pyl_vq_push(vq, slot->head, slot->written + 1);
		blk->requests++;
		out->pushed++;
		out->last = (struct pyl_blk_request){ slot->req.type,
			slot->req.sector, slot->req.data.len, slot->status };
		f->first = (f->first + 1) % DEPTH;
		f->count--;
	}
}

/*
 * Start the request in `slot`: to io_uring, or done at once.
 * REAP_ABANDONED if a reset or stop abandoned it, REAP_RING_FAILED if
 * waiting for the requests before a flush failed.
 */
static int start(struct pyl_blk *blk, struct slot *slot, uint32_t index)
{
	uint64_t written;
	int status, reaped;

	slot->done = 0;
	slot->write = slot->req.type == VIRTIO_BLK_T_OUT;
	if (slot->req.verdict < 0 &&
	    (slot->req.type == VIRTIO_BLK_T_IN ||
	     (slot->write && !blk->read_only)) &&
	    submit(blk, slot, index))
		return 0;
	/* Every write before a flush is written first. */
	if (slot->req.type == VIRTIO_BLK_T_FLUSH) {
		reaped = wait_all(blk);
		if (reaped < 0)
			return reaped;
	}
	status = execute(blk, &slot->req, &written);
	if (status < 0)
		return REAP_ABANDONED;
	finish(slot, status, written);
	return 0;
}

/*
 * Hazards.  Requests in flight together must end as if done one by one,
 * in order: a guest that names the same bytes in two requests (which no
 * sane driver does, and a hostile one may) must not see them done in some
 * other order, nor may the disk.  So a request that shares guest memory
 * with one in flight, or disk sectors it writes or that are being
 * written, waits until nothing is in flight.  Each check is bounded: a
 * chain of more than SLOT_IOVS buffers just waits.
 */
static int overlap(const uint8_t *a, uint64_t alen, const uint8_t *b,
		   uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

static int touches(const struct slot *slot, const uint8_t *p, uint64_t len)
{
	int i;

	if (overlap(slot->req.status, 1, p, len))
		return 1;
	for (i = 0; i < slot->niov; i++)
		if (overlap(slot->iov[i].iov_base, slot->iov[i].iov_len, p, len))
			return 1;
	return 0;
}

static int shares_memory(const struct pyl_blk_inflight *f,
			 const struct pyl_chain *chain)
{
	uint32_t n = chain->nreadable + chain->nwritable, i, k;

	if (n > SLOT_IOVS)
		return 1;
	for (k = 0; k < f->count; k++) {
		const struct slot *slot = &f->slot[(f->first + k) % DEPTH];

		if (slot->done)
			continue;
		for (i = 0; i < n; i++)
			if (touches(slot, chain->bufs[i].host, chain->bufs[i].len))
				return 1;
	}
	return 0;
}

static int shares_sectors(const struct pyl_blk *blk,
			  const struct request *req)
{
	const struct pyl_blk_inflight *f = blk->inflight;
	int write = req->type == VIRTIO_BLK_T_OUT;
	uint32_t k;

	/*
	 * Only a read or write that passed its checks moves data (and its
	 * sector range cannot wrap).
	 */
	if ((req->type != VIRTIO_BLK_T_IN && !write) || req->verdict >= 0)
		return 0;
	for (k = 0; k < f->count; k++) {
		const struct slot *slot = &f->slot[(f->first + k) % DEPTH];

		if (!slot->done && (write || slot->write) &&
		    req->sector < slot->req.sector + slot->size / SECTOR_SIZE &&
		    slot->req.sector < req->sector + req->data.len / SECTOR_SIZE)
			return 1;
	}
	return 0;
}

/*
 * Take the next request into a free slot and start it; -1 when one was
 * taken, else why not (an enum pyl_blk_stop).
 */
static int take(struct pyl_vq *vq, struct pyl_chain *chain,
		struct pyl_blk *blk, struct pyl_blk_outcome *out)
{
	struct pyl_blk_inflight *f = blk->inflight;
	uint32_t index = (f->first + f->count) % DEPTH;
	struct slot *slot = &f->slot[index];
	int got = pyl_vq_pop_with_notify(vq, chain);
	int reaped;

	if (got < 0)
		return PYL_BLK_RING_FAULT;
	if (got == 0)
		return PYL_BLK_EMPTY;
	if (abandoned(blk))
		return PYL_BLK_ABANDONED;
	/*
	 * Its header is read below: after any request in flight that
	 * writes those bytes.
	 */
	if (f->submitted && shares_memory(f, chain)) {
		reaped = wait_all(blk);
		if (reaped < 0)
			return stop_for(reaped);
	}
	out->rule = parse(blk, chain, &slot->req);
	if (out->rule) {
		out->head = chain->head;
		out->readable_len = chain->readable_len;
		return PYL_BLK_REQUEST_FAULT;
	}
	if (f->submitted && shares_sectors(blk, &slot->req)) {
		reaped = wait_all(blk);
		if (reaped < 0)
			return stop_for(reaped);
	}
	slot->head = chain->head;
	slot->niov = 0;
	f->count++;
	reaped = start(blk, slot, index);
	if (reaped < 0)
		return stop_for(reaped);
	return -1;
}

/*
 * Serve the ring until it is empty, `limit` requests were pushed (0: no
 * limit), a rule is broken, a reset or stop abandons the requests in
 * flight, or io_uring fails.  Requests taken before a broken one are
 * still served.
 */
int pyl_blk_drain(struct pyl_vq *vq, struct pyl_chain *chain,
		  struct pyl_blk *blk, uint32_t limit,
		  struct pyl_blk_outcome *out)
{
	struct pyl_blk_inflight *f = blk->inflight;
	int stop = -1, reaped = 0;

	memset(out, 0, sizeof(*out));
	for (;;) {
		while (stop < 0 && f->count < DEPTH) {
			if (limit && out->pushed + f->count == limit)
				stop = PYL_BLK_LIMIT;
			else
				stop = take(vq, chain, blk, out);
		}
		if (stop != PYL_BLK_ABANDONED && stop != PYL_BLK_HOST_FAULT)
			reaped = reap(blk, f->count && !f->slot[f->first].done);
		if (stop == PYL_BLK_ABANDONED || stop == PYL_BLK_HOST_FAULT ||
		    reaped < 0) {
			settle(blk);
			out->error = f->error;
			return out->stop = reaped < 0 ? stop_for(reaped) : stop;
		}
		publish(vq, blk, out);
		if (stop >= 0 && f->count == 0)
			return out->stop = stop;
	}
}
