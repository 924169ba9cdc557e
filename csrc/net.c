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
 */
#include <errno.h>
#include <poll.h>
#include <unistd.h>
#include <sys/uio.h>

#include "net.h"

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

/* Send every frame of transmitq; the device writes nothing into them. */
int pyl_net_transmit(struct pyl_vq *vq, struct pyl_chain *chain,
		     struct pyl_net *net, struct pyl_net_outcome *out)
{
	out->pushed = 0;
	for (;;) {
		int got = pyl_vq_pop_with_notify(vq, chain);

		if (got < 0)
			return out->stop = PYL_NET_RING_FAULT;
		if (got == 0)
			return out->stop = PYL_NET_DONE;
		if (abandoned(net))
			return out->stop = PYL_NET_ABANDONED;
		/*
		 * 5.1.6: the header, and at most a frame a driver that did
		 * not negotiate GSO may send.
		 */
		if (chain->readable_len < PYL_VNET_HDR_SIZE ||
		    chain->readable_len > PYL_MAX_FRAME) {
			out->head = chain->head;
			out->len = chain->readable_len;
			return out->stop = PYL_NET_FRAME_FAULT;
		}
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
	out->pushed = 0;
	for (;;) {
		int64_t received;
		int got = pyl_vq_peek(vq, chain);

		if (got <= 0) {
			/*
			 * No buffer, or a broken one: it matters only if a
			 * frame is waiting for it.
			 */
			if (!tap_has_frame(net->tap))
				return out->stop = PYL_NET_TAP_EMPTY;
			got = pyl_vq_pop_with_notify(vq, chain);
			if (got < 0)
				return out->stop = PYL_NET_RING_FAULT;
			if (got == 0)
				return out->stop = PYL_NET_STARVED;
		} else if (chain->writable_len >= PYL_VNET_HDR_SIZE) {
			if (abandoned(net))
				return out->stop = PYL_NET_ABANDONED;
			received = read_frame(net, chain);
			if (received < 0)
				return out->stop = PYL_NET_TAP_EMPTY;
			pyl_vq_consume(vq);
			goto push;
		} else if (tap_has_frame(net->tap)) {
			pyl_vq_consume(vq);	/* a frame for a buffer too small */
		} else {
			return out->stop = PYL_NET_TAP_EMPTY;
		}
		/* Taken by pop_with_notify or consume, with a frame waiting. */
		if (abandoned(net))
			return out->stop = PYL_NET_ABANDONED;
		if (chain->writable_len < PYL_VNET_HDR_SIZE) {
			out->head = chain->head;
			out->len = chain->writable_len;
			return out->stop = PYL_NET_ROOM_FAULT;
		}
		received = read_frame(net, chain);
		if (received < 0)		/* cannot be: the frame waits */
			received = 0;
push:
		net->received += received > 0;
		pyl_vq_push(vq, chain->head, received);
		out->pushed++;
	}
}
