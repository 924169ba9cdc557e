/*
 * console.c: the virtio console, both directions.
 *
 * Two queues. On the transmit queue (1) we hand the launcher readable
 * buffers and it writes their bytes to its console (the terminal, or a
 * unix socket). On the receive queue (0) we leave empty writable buffers
 * and the launcher fills them with whatever is typed, then interrupts us.
 *
 * So this guest does what echo.c does with the UART, through a device
 * instead of a port: it greets, echoes input in upper case ('\r' as
 * "\r\n"), and ends at 'q'. Everything from the greeting on goes through
 * the virtio console; the UART only carries the setup lines before it.
 *
 * Virtio console output (raw bytes, lines end in \r\n):
 *   console: hello through the virtio console
 *   <the echo>
 *   console: bye                        on a line of its own, exit 0
 * UART: the bus lines, then "console: ready (virtio console)", and on a
 * failure a line "console: ..." saying what, exit 1.
 */
#include "lib/boot_params.h"
#include "lib/io.h"
#include "lib/irq.h"
#include "lib/lguest_bus.h"
#include "lib/printf.h"
#include "lib/timer.h"
#include "lib/virtqueue.h"

#define RECEIVEQ	0
#define TRANSMITQ	1
#define RX_BUFS		4		/* input buffers left with the device */
#define RX_SIZE		64
#define TX_SIZE		(2 * RX_SIZE + 32)	/* an echo, or a message */
#define WAIT_MS		5000

static struct virtqueue rx, tx;
static u8 rx_buf[RX_BUFS][RX_SIZE];
static char tx_buf[TX_SIZE];
static bool mid_line;			/* echoed bytes since the last newline */

static void console_interrupt(unsigned int irq)
{
	(void)irq;	/* vq_wait() looks at the used rings itself */
}

/* Hand one empty buffer to the device for input. */
static bool post_rx(u8 *buf)
{
	struct vq_seg seg = { buf, RX_SIZE };

	return vq_add(&rx, NULL, 0, &seg, 1, buf, false) >= 0;
}

/*
 * Send n bytes and wait until the device has taken them: tx_buf is
 * reused for the next message, so it must be free again first. (A real
 * driver would keep several in flight and reclaim them later.)
 */
static bool send(const char *s, unsigned int n)
{
	struct vq_seg seg;
	unsigned int i;

	if (n > TX_SIZE)
		n = TX_SIZE;
	seg = (struct vq_seg){ tx_buf, n };
	for (i = 0; i < n; i++)
		tx_buf[i] = s[i];
	if (vq_add(&tx, &seg, 1, NULL, 0, tx_buf, false) < 0) {
		printf("console: the transmit queue is full\n");
		return false;
	}
	vq_kick(&tx);
	if (!vq_wait(&tx, WAIT_MS) || vq_get_used(&tx, NULL) != tx_buf) {
		printf("console: the device did not take our output\n");
		return false;
	}
	return true;
}

static bool send_str(const char *s)
{
	unsigned int n = 0;

	while (s[n])
		n++;
	return send(s, n);
}

/* One received buffer, echoed in upper case. Returns true at 'q'. */
static bool echo(const u8 *in, u32 len, bool *ok)
{
	static char out[TX_SIZE];
	unsigned int n = 0, i;
	bool quit = false;

	for (i = 0; i < len && i < RX_SIZE; i++) {
		char c = in[i];

		if (c == 'q') {
			quit = true;
			break;		/* what follows 'q' is not ours */
		}
		if (c == '\r') {	/* a terminal's Enter */
			out[n++] = '\r';
			out[n++] = '\n';
			mid_line = false;
			continue;
		}
		if (c >= 'a' && c <= 'z')
			c -= 'a' - 'A';
		out[n++] = c;
		mid_line = (c != '\n');
	}
	if (n)
		*ok = send(out, n);
	return quit;
}

static bool setup(struct lguest_device *dev, u32 wanted)
{
	u32 features = lguest_begin(dev, wanted);
	unsigned int i;

	if (!lguest_find_vq(dev, RECEIVEQ, &rx, "console/receiveq", features) ||
	    !lguest_find_vq(dev, TRANSMITQ, &tx, "console/transmitq", features))
		return false;
	lguest_driver_ok(dev);

	/* Input can come at any time: give the device room for it now. */
	for (i = 0; i < RX_BUFS; i++)
		if (!post_rx(rx_buf[i]))
			return false;
	vq_kick(&rx);
	return true;
}

int guest_main(struct boot_params *bp)
{
	struct lguest_device *dev;
	bool ok = true, quit = false;

	irq_init();
	timer_init();
	lguest_bus_scan(bp);
	dev = lguest_find_device(VIRTIO_ID_CONSOLE, 0);
	if (!dev) {
		printf("console: no virtio console on the bus "
		       "(run with --console stdio)\n");
		return 1;
	}
	irq_register(lguest_irq(dev), console_interrupt);
	if (!setup(dev, lguest_ring_features(bp))) {
		printf("console: setting up the device failed\n");
		goto failed;
	}
	printf("console: ready (virtio console)\n");

	if (!send_str("console: hello through the virtio console\r\n"))
		goto failed;

	/* Sleep until input arrives; the launcher's --timeout bounds us. */
	while (!quit && ok) {
		u8 *buf;
		u32 len;

		vq_wait(&rx, 0);
		while (!quit && ok && (buf = vq_get_used(&rx, &len))) {
			quit = echo(buf, len, &ok);
			if (!quit && !post_rx(buf))	/* the buffer goes back */
				ok = false;
		}
		if (rx.broken)
			ok = false;
		vq_kick(&rx);
	}
	if (!ok)
		goto failed;

	if (!send_str(mid_line ? "\r\nconsole: bye\r\n" : "console: bye\r\n"))
		goto failed;
	return 0;

failed:
	printf("console: failed\n");
	lguest_failed(dev);
	return 1;
}
