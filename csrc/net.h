/* The virtio net frame loops (net.c): what Python gives them, what they say. */
#ifndef PYL_NET_H
#define PYL_NET_H

#include <stdint.h>

#include "virtq.h"

#define PYL_VNET_HDR_SIZE	10	/* legacy virtio_net_hdr, no MRG_RXBUF */
/*
 * The header, then an ethernet frame of up to a 65535-byte packet behind a
 * 14-byte header and a 4-byte VLAN tag.
 */
#define PYL_MAX_FRAME		(PYL_VNET_HDR_SIZE + 14 + 4 + 65535)

/*
 * The stream mode's buffers (a daemon such as passt on a SOCK_STREAM
 * socket, each frame behind its length, 4 bytes big-endian): each holds
 * several whole frames, and always room for the largest one.
 */
#define PYL_STREAM_PREFIX	4
#define PYL_STREAM_FRAME_MAX	(PYL_MAX_FRAME - PYL_VNET_HDR_SIZE)	/* no header */
#define PYL_STREAM_BUF		(256 * 1024)

enum pyl_net_mode {
	PYL_NET_MODE_TAP = 0,		/* a tap with IFF_VNET_HDR: frames kept */
	PYL_NET_MODE_STREAM,		/* [4-byte BE length][frame], no header */
};

struct pyl_net {
	int tap;			/* non-blocking, keeps frame boundaries */
	int *abandon;			/* set: drop the frame in flight */
	uint8_t *bounce;		/* PYL_MAX_FRAME bytes */
	uint64_t sent;
	uint64_t dropped;		/* transmit failed: a link that is down */
	uint64_t received;
	int read_errno;			/* the last failed tap read, or 0 */
	/* Stream mode only (mode PYL_NET_MODE_STREAM; `tap` is the socket). */
	int mode;			/* enum pyl_net_mode */
	uint8_t *tx;			/* PYL_STREAM_BUF bytes: framed, unsent */
	uint32_t tx_start, tx_end;	/* the unsent bytes: tx[tx_start..tx_end) */
	uint8_t *rx;			/* PYL_STREAM_BUF bytes: read, not given */
	uint32_t rx_start, rx_end;	/* ... rx[rx_start..rx_end) */
	uint64_t bad_length;		/* the length a STREAM_FAULT read */
	int write_errno;		/* the write that lost the stream, or 0 */
};

enum pyl_net_stop {
	PYL_NET_DONE = 0,		/* transmit: the ring is empty */
	PYL_NET_TAP_EMPTY,		/* receive: no frame waiting */
	PYL_NET_STARVED,		/* receive: a frame, but no buffer */
	PYL_NET_RING_FAULT,		/* a ring rule: vq->fault says which */
	PYL_NET_FRAME_FAULT,		/* 5.1.6: a sent frame's size */
	PYL_NET_ROOM_FAULT,		/* 5.1.6: room for the header */
	PYL_NET_ABANDONED,		/* a reset or stop is waiting */
	PYL_NET_STREAM_FULL,		/* transmit: the unsent bytes fill tx */
	PYL_NET_STREAM_FAULT,		/* receive: a frame length out of range */
	PYL_NET_STREAM_CLOSED,		/* the peer closed, or a fatal error */
};

struct pyl_net_outcome {
	int stop;			/* enum pyl_net_stop */
	uint32_t pushed;
	uint16_t head;			/* for the two faults */
	uint64_t len;			/* the frame's or the room's bytes */
};

int pyl_net_transmit(struct pyl_vq *vq, struct pyl_chain *chain,
		     struct pyl_net *net, struct pyl_net_outcome *out);
int pyl_net_receive(struct pyl_vq *vq, struct pyl_chain *chain,
		    struct pyl_net *net, struct pyl_net_outcome *out);
int pyl_net_flush(struct pyl_net *net);

#endif
