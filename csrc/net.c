/*
 * The virtio net frame loops, on a Linux tap opened with IFF_VNET_HDR.
 *
 * Every frame on either queue starts with the 10-byte legacy struct
 * virtio_net_hdr, and that is exactly what the tap puts in front of every
 * frame it gives us and expects in front of every frame we give it.  So a
 * transmit chain goes to the tap with one writev, and a received frame
 * lands in the guest's buffers with one readv, straight into guest
 * memory, header included.  Only a driver that scatters one frame over
 * more than IOV_MAX buffers costs a copy, through one bounce buffer.
 *
 * Python calls these with the GIL released, once per kick (transmit) or
 * per wakeup of its receive thread (receive), and keeps the policy: when
 * to stop reading the tap, what a broken rule means.
 *
 * The same loops serve a user-mode network daemon (passt) in stream mode,
 * at the end of this file: a connected SOCK_STREAM socket where every
 * frame travels behind its length, 4 bytes big-endian, without the
 * virtio_net_hdr (we offer no offloads, so the guest's says nothing).
 */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "virtq.h"

#define NET_IOV_MAX	1024	/* Linux's UIO_MAXIOV */

static inline int abandoned(const struct pyl_net *net)
{
	return net->abandon && READ_ONCE(*net->abandon);
}

static void buffers_to_iov(const struct pyl_buffer *buf, uint32_t count,
			   uint64_t limit, struct iovec *iov)
{
	uint32_t i;

	for (i = 0; i < count; i++) {
		uint64_t n = buf[i].len < limit ? buf[i].len : limit;

		iov[i].iov_base = buf[i].host;
		iov[i].iov_len = n;
		limit -= n;
	}
}

/* One chain of transmitq to the tap. */
static void send_frame(struct pyl_net *net, const struct pyl_chain *chain)
{
	struct iovec iov[NET_IOV_MAX];
	ssize_t n;

	if (chain->nreadable <= NET_IOV_MAX) {
		buffers_to_iov(chain->bufs, chain->nreadable,
			       chain->readable_len, iov);
		n = writev(net->tap, iov, chain->nreadable);
	} else {
		pyl_chain_copy_out(chain, 0, net->bounce, chain->readable_len);
		n = write(net->tap, net->bounce, chain->readable_len);
	}
	/*
	 * A tap that cannot take it (its queue is full, the link is down)
	 * drops the frame, as a NIC would.
	 */
	if (n < 0)
		net->dropped++;
	else
		net->sent++;
}

static int stream_transmit(struct pyl_vq *vq, struct pyl_chain *chain,
			   struct pyl_net *net, struct pyl_net_outcome *out);
static int stream_receive(struct pyl_vq *vq, struct pyl_chain *chain,
			  struct pyl_net *net, struct pyl_net_outcome *out);

/*
 * 5.1.6: a sent chain holds the header and at most a frame a driver that
 * did not negotiate GSO may send.  1 (and the outcome filled in) if not.
 */
static int frame_fault(const struct pyl_chain *chain,
		       struct pyl_net_outcome *out)
{
	if (chain->readable_len >= PYL_VNET_HDR_SIZE &&
	    chain->readable_len <= PYL_MAX_FRAME)
		return 0;
	out->head = chain->head;
	out->len = chain->readable_len;
	out->stop = PYL_NET_FRAME_FAULT;
	return 1;
}

/* 5.1.6: a receive buffer has room for at least the header. */
static int room_fault(const struct pyl_chain *chain,
		      struct pyl_net_outcome *out)
{
	if (chain->writable_len >= PYL_VNET_HDR_SIZE)
		return 0;
	out->head = chain->head;
	out->len = chain->writable_len;
	out->stop = PYL_NET_ROOM_FAULT;
	return 1;
}

/* Send every frame of transmitq; the device writes nothing into them. */
int pyl_net_transmit(struct pyl_vq *vq, struct pyl_chain *chain,
		     struct pyl_net *net, struct pyl_net_outcome *out)
{
	if (net->mode == PYL_NET_MODE_STREAM)
		return stream_transmit(vq, chain, net, out);
	out->pushed = 0;
	for (;;) {
		int got = pyl_vq_pop_with_notify(vq, chain);

		if (got < 0)
			return out->stop = PYL_NET_RING_FAULT;
		if (got == 0)
			return out->stop = PYL_NET_DONE;
		if (abandoned(net))
			return out->stop = PYL_NET_ABANDONED;
		if (frame_fault(chain, out))
			return out->stop;
		send_frame(net, chain);
		pyl_vq_push(vq, chain->head, 0);
		out->pushed++;
	}
}

static int tap_has_frame(int tap)
{
	struct pollfd p = { .fd = tap, .events = POLLIN };

	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/*
 * One frame from the tap into the chain's writable buffers: the bytes
 * written (a frame longer than the room is cut, as a tap cuts it), or -1
 * if the tap had none after all.
 */
static int64_t read_frame(struct pyl_net *net, const struct pyl_chain *chain)
{
	const struct pyl_buffer *room = chain->bufs + chain->nreadable;
	uint64_t limit = chain->writable_len < PYL_MAX_FRAME ?
			 chain->writable_len : PYL_MAX_FRAME;
	struct iovec iov[NET_IOV_MAX];
	uint32_t count = 0;
	uint64_t left = limit;
	ssize_t n;

	/* Only the buffers the first MAX_FRAME bytes fall in. */
	while (left) {
		left -= room[count].len < left ? room[count].len : left;
		count++;
	}
	if (count <= NET_IOV_MAX) {
		buffers_to_iov(room, count, limit, iov);
		n = readv(net->tap, iov, count);
		if (n > 0)
			return n;
	} else {
		n = read(net->tap, net->bounce, PYL_MAX_FRAME);
		if (n > 0)
			return pyl_chain_copy_in(chain, 0, net->bounce, n);
	}
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return -1;
	/*
	 * The buffer goes back empty; the guest's driver counts it as an
	 * rx error, as for a bad frame.  Python reports read_errno.
	 */
	if (n < 0)
		net->read_errno = errno;
	return 0;
}

/*
 * The next frame into the next receive buffer: -1 once the buffer is
 * taken and *received is the frame's length (0: the buffer goes back
 * empty), or why receiving stops.
 */
static int next_frame(struct pyl_vq *vq, struct pyl_chain *chain,
		      struct pyl_net *net, struct pyl_net_outcome *out,
		      int64_t *received)
{
	int got = pyl_vq_peek(vq, chain);

	if (got > 0 && chain->writable_len >= PYL_VNET_HDR_SIZE) {
		/* The common case: read straight into the peeked buffer. */
		if (abandoned(net))
			return PYL_NET_ABANDONED;
		*received = read_frame(net, chain);
		if (*received < 0)
			return PYL_NET_TAP_EMPTY;
		pyl_vq_consume(vq);
		return -1;
	}
	/*
	 * No buffer, a broken one, or one too small for the header: each
	 * matters only if a frame is waiting for it.
	 */
	if (!tap_has_frame(net->tap))
		return PYL_NET_TAP_EMPTY;
	if (got > 0) {
		pyl_vq_consume(vq);	/* a frame for a buffer too small */
	} else {
		got = pyl_vq_pop_with_notify(vq, chain);
		if (got < 0)
			return PYL_NET_RING_FAULT;
		if (got == 0)
			return PYL_NET_STARVED;
	}
	/* Taken by pop_with_notify or consume, with a frame waiting. */
	if (abandoned(net))
		return PYL_NET_ABANDONED;
	if (room_fault(chain, out))
		return out->stop;
	*received = read_frame(net, chain);
	if (*received < 0)		/* cannot be: the frame waits */
		*received = 0;
	return -1;
}

/*
 * Move frames from the tap into posted receive buffers while there are
 * both.  Only one thread at a time gets here (the device's lock), and a
 * buffer is taken only for a frame: we look at the next buffer (peek),
 * read the non-blocking tap straight into it, and take it (consume) once
 * a frame landed there; when the read finds the tap empty the buffer
 * stays the guest's, untouched as far as it can tell.  That needs no
 * poll() per frame, only one where there is no good buffer to try.
 */
int pyl_net_receive(struct pyl_vq *vq, struct pyl_chain *chain,
		    struct pyl_net *net, struct pyl_net_outcome *out)
{
	if (net->mode == PYL_NET_MODE_STREAM)
		return stream_receive(vq, chain, net, out);
	out->pushed = 0;
	for (;;) {
		int64_t received;
		int stop = next_frame(vq, chain, net, out, &received);

		if (stop >= 0)
			return out->stop = stop;
		net->received += received > 0;
		pyl_vq_push(vq, chain->head, received);
		out->pushed++;
	}
}

/*
 * Stream mode.  A stream has no frame boundaries of its own, so a frame
 * must never be half sent or half taken: both directions go through a
 * buffer of the device's (PYL_STREAM_BUF bytes, room for several frames
 * and always for the largest), and the socket is never waited on.
 *
 * Transmit frames each chain into tx ([length][frame], the guest's header
 * left out) and pushes it back at once; tx goes out with non-blocking
 * sends, a quarter at a time and at the end of the ring.  What the socket
 * will not take yet stays in tx, the rest of a frame first, so the stream
 * stays whole; Python watches for POLLOUT while any is left, and calls
 * pyl_net_flush (or transmit again).  Once tx has no room for the largest
 * frame the ring waits (STREAM_FULL), as a NIC's would.
 *
 * Receive reads the socket into rx and gives each whole frame to the next
 * receive buffer, behind a zeroed header.  The length is the daemon's:
 * it is checked before anything is taken on its word, and one out of
 * range (0, or above PYL_STREAM_FRAME_MAX) is a STREAM_FAULT: the stream
 * cannot be trusted any more, and nothing is allocated or read for it.
 */

static inline uint32_t get_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

static inline void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

/*
 * Send what tx holds, without blocking: 1 when all went, 0 when some is
 * left (the socket is full), -1 when the stream is lost (write_errno; the
 * unsent bytes are dropped: nobody will read them).
 */
int pyl_net_flush(struct pyl_net *net)
{
	while (net->tx_start < net->tx_end) {
		ssize_t n = send(net->tap, net->tx + net->tx_start,
				 net->tx_end - net->tx_start,
				 MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			net->write_errno = errno;
			net->tx_start = net->tx_end = 0;
			return -1;
		}
		net->tx_start += n;
	}
	net->tx_start = net->tx_end = 0;
	return 1;
}

/* Room in tx for `need` more bytes, moving the unsent ones to its front. */
static int tx_room(struct pyl_net *net, uint32_t need)
{
	if (PYL_STREAM_BUF - net->tx_end >= need)
		return 1;
	if (net->tx_start) {
		memmove(net->tx, net->tx + net->tx_start,
			net->tx_end - net->tx_start);
		net->tx_end -= net->tx_start;
		net->tx_start = 0;
	}
	return PYL_STREAM_BUF - net->tx_end >= need;
}

static int stream_transmit(struct pyl_vq *vq, struct pyl_chain *chain,
			   struct pyl_net *net, struct pyl_net_outcome *out)
{
	const uint32_t largest = PYL_STREAM_PREFIX + PYL_STREAM_FRAME_MAX;

	out->pushed = 0;
	for (;;) {
		uint32_t len;
		int got;

		if (net->tx_end - net->tx_start >= PYL_STREAM_BUF / 4 &&
		    pyl_net_flush(net) < 0)
			return out->stop = PYL_NET_STREAM_CLOSED;
		if (!tx_room(net, largest)) {
			if (pyl_net_flush(net) < 0)
				return out->stop = PYL_NET_STREAM_CLOSED;
			if (!tx_room(net, largest))
				return out->stop = PYL_NET_STREAM_FULL;
		}
		got = pyl_vq_pop_with_notify(vq, chain);
		if (got < 0)
			return out->stop = PYL_NET_RING_FAULT;
		if (got == 0) {
			if (pyl_net_flush(net) < 0)
				return out->stop = PYL_NET_STREAM_CLOSED;
			return out->stop = PYL_NET_DONE;
		}
		if (abandoned(net))
			return out->stop = PYL_NET_ABANDONED;
		if (frame_fault(chain, out))
			return out->stop;
		len = chain->readable_len - PYL_VNET_HDR_SIZE;
		if (len == 0) {
			/* No frame: length 0 means nothing on a stream. */
			net->dropped++;
			pyl_vq_push(vq, chain->head, 0);
			out->pushed++;
			continue;
		}
		put_be32(net->tx + net->tx_end, len);
		pyl_chain_copy_out(chain, PYL_VNET_HDR_SIZE,
				   net->tx + net->tx_end + PYL_STREAM_PREFIX, len);
		net->tx_end += PYL_STREAM_PREFIX + len;
		net->sent++;
		pyl_vq_push(vq, chain->head, 0);
		out->pushed++;
	}
}

/*
 * Is a whole frame at the front of rx?  Reads the socket until one is, or
 * it would block.  1: yes; 0: not yet; -1: the next length is out of range
 * (bad_length); -2: the stream ended (closed, or read_errno).
 */
static int stream_frame_ready(struct pyl_net *net)
{
	for (;;) {
		uint32_t have = net->rx_end - net->rx_start;
		ssize_t n;

		if (have >= PYL_STREAM_PREFIX) {
			uint32_t len = get_be32(net->rx + net->rx_start);

			if (len == 0 || len > PYL_STREAM_FRAME_MAX) {
				net->bad_length = len;
				return -1;
			}
			if (have >= PYL_STREAM_PREFIX + len)
				return 1;
		}
		/*
		 * Part of a frame at most (less than the largest): to the
		 * front, and read behind it.
		 */
		if (net->rx_start) {
			memmove(net->rx, net->rx + net->rx_start, have);
			net->rx_start = 0;
			net->rx_end = have;
		}
		n = recv(net->tap, net->rx + net->rx_end,
			 PYL_STREAM_BUF - net->rx_end, MSG_DONTWAIT);
		if (n > 0) {
			net->rx_end += n;
			continue;
		}
		if (n == 0)
			return -2;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			return 0;
		net->read_errno = errno;
		return -2;
	}
}

/* The frame at the front of rx into the chain, behind a zeroed header. */
static uint64_t stream_deliver(struct pyl_net *net,
			       const struct pyl_chain *chain)
{
	static const uint8_t header[PYL_VNET_HDR_SIZE];
	uint32_t len = get_be32(net->rx + net->rx_start);
	uint64_t room = chain->writable_len - PYL_VNET_HDR_SIZE;
	uint64_t n;

	n = pyl_chain_copy_in(chain, 0, header, PYL_VNET_HDR_SIZE);
	/* A frame longer than the room is cut, as a tap cuts it. */
	n += pyl_chain_copy_in(chain, PYL_VNET_HDR_SIZE,
			       net->rx + net->rx_start + PYL_STREAM_PREFIX,
			       len < room ? len : room);
	net->rx_start += PYL_STREAM_PREFIX + len;
	if (net->rx_start == net->rx_end)
		net->rx_start = net->rx_end = 0;
	return n;
}

/*
 * As pyl_net_receive: a buffer is taken only for a whole frame, and one
 * too small for the header breaks the device (the frame stays in rx).
 */
static int stream_receive(struct pyl_vq *vq, struct pyl_chain *chain,
			  struct pyl_net *net, struct pyl_net_outcome *out)
{
	out->pushed = 0;
	for (;;) {
		int ready = stream_frame_ready(net);
		int got;

		if (ready == -1)
			return out->stop = PYL_NET_STREAM_FAULT;
		if (ready == -2)
			return out->stop = PYL_NET_STREAM_CLOSED;
		if (ready == 0)
			return out->stop = PYL_NET_TAP_EMPTY;
		if (abandoned(net))
			return out->stop = PYL_NET_ABANDONED;
		got = pyl_vq_peek(vq, chain);
		if (got > 0) {
			pyl_vq_consume(vq);
		} else {
			got = pyl_vq_pop_with_notify(vq, chain);
			if (got < 0)
				return out->stop = PYL_NET_RING_FAULT;
			if (got == 0)
				return out->stop = PYL_NET_STARVED;
		}
		if (room_fault(chain, out))
			return out->stop;
		pyl_vq_push(vq, chain->head, stream_deliver(net, chain));
		net->received++;
		out->pushed++;
	}
}
