/*
 * net.c: the virtio network device: one ARP question, one answer.
 *
 * Two queues, as for the console: receive (0), where we leave empty
 * buffers for frames arriving from the launcher's tap interface, and
 * transmit (1), where we hand it frames to send. Every frame on either
 * queue starts with the 10-byte legacy struct virtio_net_hdr (all zeros:
 * no checksum offload, no segmentation), in a descriptor of its own, as
 * a legacy device without VIRTIO_F_ANY_LAYOUT expects.
 *
 * We ask the one question any Linux network stack on the tap's side
 * answers without being set up for us: an ARP request, broadcast,
 * "who has <peer>? tell <ip>", from the MAC in the device's config space.
 * Then we wait for frames and print each; the ARP reply ends the run.
 * The request is sent again every second (the tap may come up late, and
 * the first frame can go before the peer listens), for 10 s at most.
 *
 * Command line: ip=A.B.C.D (default 10.0.2.15), peer=A.B.C.D (default
 * 10.0.2.2), wait=MS (default 10000); indirect=0, event_idx=0 as in lib/.
 *
 * Output (lines end in \r\n), after the bus lines:
 *   net: mac 52:54:00:12:34:56
 *   net: sent arp who-has 10.0.2.2 tell 10.0.2.15      (each time)
 *   net: received <len> bytes ethertype 0x%04x         (each frame;
 *        len counts the Ethernet frame, not the virtio_net_hdr)
 *   net: arp reply from 10.0.2.2 is <mac>
 * exit 0; on a failure (or no reply in time) a line "net: ..." saying
 * what, exit 1.
 */
#include "lib/boot_params.h"
#include "lib/io.h"
#include "lib/irq.h"
#include "lib/lguest_bus.h"
#include "lib/printf.h"
#include "lib/timer.h"
#include "lib/virtqueue.h"

#define VIRTIO_NET_F_MAC	5	/* config[0..5] is our MAC */
#define VNET_HDR_SIZE		10	/* legacy virtio_net_hdr, no MRG_RXBUF */

#define RECEIVEQ	0
#define TRANSMITQ	1
#define RX_BUFS		4
#define ETH_MAX		1514	/* frame without FCS, 1500-byte payload */
#define ETH_MIN		60	/* shorter frames are padded to this */
#define ETH_HLEN	14
#define ETHERTYPE_ARP	0x0806
#define ETHERTYPE_IPV4	0x0800
#define ARP_REQUEST	1
#define ARP_REPLY	2
#define ARP_LEN		28	/* for Ethernet and IPv4 */
#define TX_WAIT_MS	2000
#define RESEND_MS	1000

static struct virtqueue rx, tx;
static u8 rx_hdr[RX_BUFS][VNET_HDR_SIZE];
static u8 rx_frame[RX_BUFS][ETH_MAX];
static u8 tx_hdr[VNET_HDR_SIZE];	/* zeros: nothing offloaded */
static u8 tx_frame[ETH_MIN];

static u8 mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
static u8 ip[4] = { 10, 0, 2, 15 };
static u8 peer[4] = { 10, 0, 2, 2 };

static void net_interrupt(unsigned int irq)
{
	(void)irq;	/* vq_wait() looks at the used rings itself */
}

/* --- Bytes on the wire are big-endian. */

static void put16(u8 *p, u16 v)
{
	p[0] = v >> 8;
	p[1] = v;
}

static u16 get16(const u8 *p)
{
	return p[0] << 8 | p[1];
}

static void copy(u8 *to, const u8 *from, unsigned int n)
{
	while (n--)
		*to++ = *from++;
}

static bool equal(const u8 *a, const u8 *b, unsigned int n)
{
	while (n--)
		if (*a++ != *b++)
			return false;
	return true;
}

/* "A.B.C.D" from the command line into out; false if it is not one. */
static bool cmdline_ipv4(const struct boot_params *bp, const char *key,
			 u8 out[4])
{
	const char *s = cmdline_get(bp, key);
	u8 addr[4];
	unsigned int i;
	u64 v;

	if (!s)
		return true;		/* not given: keep the default */
	for (i = 0; i < 4; i++) {
		if (!parse_u64(s, &v, &s) || v > 255)
			return false;
		addr[i] = v;
		if (i < 3 && *s++ != '.')
			return false;
	}
	if (*s && *s != ' ')
		return false;		/* "10.0.2.15x" */
	copy(out, addr, 4);
	return true;
}

static void print_mac(const u8 *m)
{
	printf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4],
	       m[5]);
}

/* --- Receiving: buffers wait in the ring until a frame fills one. */

static bool post_rx(unsigned int i)
{
	struct vq_seg in[2] = {
		{ rx_hdr[i], VNET_HDR_SIZE },
		{ rx_frame[i], ETH_MAX },
	};

	/* Indirect when we can: the pair takes one ring slot, not two. */
	return vq_add(&rx, NULL, 0, in, 2, rx_frame[i], true) >= 0;
}

/* One frame in; true if it is the ARP reply we wait for. */
static bool handle_frame(const u8 *f, u32 used_len)
{
	const u8 *arp = f + ETH_HLEN;
	u32 len;

	if (used_len < VNET_HDR_SIZE + ETH_HLEN) {
		printf("net: received a %u-byte buffer: too short for a frame\n",
		       used_len);
		return false;
	}
	len = used_len - VNET_HDR_SIZE;
	printf("net: received %u bytes ethertype 0x%04x\n", len, get16(f + 12));

	if (get16(f + 12) != ETHERTYPE_ARP || len < ETH_HLEN + ARP_LEN)
		return false;
	/* htype 1 (Ethernet), ptype IPv4, a reply, from the peer, to us. */
	if (get16(arp) != 1 || get16(arp + 2) != ETHERTYPE_IPV4 ||
	    get16(arp + 6) != ARP_REPLY || !equal(arp + 14, peer, 4) ||
	    !equal(arp + 24, ip, 4))
		return false;
	printf("net: arp reply from %u.%u.%u.%u is ", peer[0], peer[1],
	       peer[2], peer[3]);
	print_mac(arp + 8);
	printf("\n");
	return true;
}

/* --- Sending. */

/* Ethernet broadcast + ARP "who-has peer tell ip" (RFC 826). */
static void build_arp_request(u8 *f)
{
	u8 *arp = f + ETH_HLEN;
	unsigned int i;

	for (i = 0; i < ETH_MIN; i++)
		f[i] = 0;			/* padding included */
	for (i = 0; i < 6; i++)
		f[i] = 0xff;			/* to everyone */
	copy(f + 6, mac, 6);
	put16(f + 12, ETHERTYPE_ARP);

	put16(arp, 1);				/* hardware: Ethernet */
	put16(arp + 2, ETHERTYPE_IPV4);		/* protocol: IPv4 */
	arp[4] = 6;				/* hardware address length */
	arp[5] = 4;				/* protocol address length */
	put16(arp + 6, ARP_REQUEST);
	copy(arp + 8, mac, 6);			/* sender: us */
	copy(arp + 14, ip, 4);
	copy(arp + 24, peer, 4);		/* target MAC stays 0 */
}

/* Send tx_frame and wait until the device has taken it (we reuse it). */
static bool send_arp(void)
{
	struct vq_seg out[2] = {
		{ tx_hdr, VNET_HDR_SIZE },
		{ tx_frame, ETH_MIN },
	};

	build_arp_request(tx_frame);
	if (vq_add(&tx, out, 2, NULL, 0, tx_frame, false) < 0) {
		printf("net: the transmit queue is full\n");
		return false;
	}
	vq_kick(&tx);
	if (!vq_wait(&tx, TX_WAIT_MS) || vq_get_used(&tx, NULL) != tx_frame) {
		printf("net: the device did not take our frame\n");
		return false;
	}
	printf("net: sent arp who-has %u.%u.%u.%u tell %u.%u.%u.%u\n",
	       peer[0], peer[1], peer[2], peer[3], ip[0], ip[1], ip[2], ip[3]);
	return true;
}

/* --- Bringing the device up. */

static bool setup(struct lguest_device *dev, u32 wanted)
{
	u32 features = lguest_begin(dev, wanted | 1u << VIRTIO_NET_F_MAC);
	unsigned int i;

	if (features & 1u << VIRTIO_NET_F_MAC)
		lguest_config_read(dev, 0, mac, 6);
	else
		printf("net: the device has no MAC for us; using our own\n");
	printf("net: mac ");
	print_mac(mac);
	printf("\n");

	if (!lguest_find_vq(dev, RECEIVEQ, &rx, "net/receiveq", features) ||
	    !lguest_find_vq(dev, TRANSMITQ, &tx, "net/transmitq", features))
		return false;
	lguest_driver_ok(dev);

	for (i = 0; i < RX_BUFS; i++)
		if (!post_rx(i))
			return false;
	vq_kick(&rx);
	return true;
}

static u64 min_u64(u64 a, u64 b)
{
	return a < b ? a : b;
}

/* Take what arrived; true once the ARP reply is among it. */
static bool drain_rx(bool *ok)
{
	u8 *f;
	u32 len;

	while ((f = vq_get_used(&rx, &len))) {
		if (handle_frame(f, len))
			return true;
		/* Give the buffer back: its token is rx_frame[i]. */
		if (!post_rx((f - rx_frame[0]) / ETH_MAX))
			*ok = false;
	}
	if (rx.broken)
		*ok = false;
	vq_kick(&rx);
	return false;
}

/*
 * Until the reply comes or wait_ms pass: sleep until a frame arrives or
 * it is time to ask again, whichever is first.
 */
static bool exchange(unsigned int wait_ms)
{
	u64 start = timer_ms(), last_sent = 0, now;
	bool ok = true, first = true;

	while (ok && (now = timer_ms()) - start < wait_ms) {
		if (first || now - last_sent >= RESEND_MS) {
			if (!send_arp())
				return false;
			last_sent = timer_ms();
			first = false;
			continue;
		}
		vq_wait(&rx, min_u64(last_sent + RESEND_MS - now,
				     start + wait_ms - now));
		if (drain_rx(&ok))
			return true;
	}
	if (ok)
		printf("net: no arp reply from %u.%u.%u.%u in %u ms\n",
		       peer[0], peer[1], peer[2], peer[3], wait_ms);
	return false;
}

int guest_main(struct boot_params *bp)
{
	struct lguest_device *dev;

	irq_init();
	timer_init();
	if (!cmdline_ipv4(bp, "ip", ip) || !cmdline_ipv4(bp, "peer", peer)) {
		printf("net: ip= and peer= take A.B.C.D\n");
		return 1;
	}
	lguest_bus_scan(bp);
	dev = lguest_find_device(VIRTIO_ID_NET, 0);
	if (!dev) {
		printf("net: no network device on the bus "
		       "(run with --net tap:NAME)\n");
		return 1;
	}
	irq_register(lguest_irq(dev), net_interrupt);

	if (!setup(dev, lguest_ring_features(bp))) {
		printf("net: setting up the device failed\n");
		goto failed;
	}
	if (exchange(cmdline_get_u64(bp, "wait", 10000)))
		return 0;

failed:
	lguest_failed(dev);
	return 1;
}
