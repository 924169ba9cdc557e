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

struct pyl_net {
	int tap;			/* non-blocking, keeps frame boundaries */
	int *abandon;			/* set: drop the frame in flight */
	uint8_t *bounce;		/* PYL_MAX_FRAME bytes */
	uint64_t sent;
	uint64_t dropped;		/* transmit failed: a link that is down */
	uint64_t received;
	int read_errno;			/* the last failed tap read, or 0 */
};

enum pyl_net_stop {
	PYL_NET_DONE = 0,		/* transmit: the ring is empty */
	PYL_NET_TAP_EMPTY,		/* receive: no frame waiting */
	PYL_NET_STARVED,		/* receive: a frame, but no buffer */
	PYL_NET_RING_FAULT,		/* a ring rule: vq->fault says which */
	PYL_NET_FRAME_FAULT,		/* 5.1.6: a sent frame's size */
	PYL_NET_ROOM_FAULT,		/* 5.1.6: room for the header */
	PYL_NET_ABANDONED,		/* a reset or stop is waiting */
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

#endif
