/*
 * rng.c: the virtio entropy device, and what a reset means.
 *
 * The simplest device there is: one queue, and every request is one
 * writable buffer that the launcher fills with random bytes. We read 32
 * bytes, then reset the device (status 0, notify), which makes it forget
 * the queue, and bring it up again from the start, as a driver does when
 * it is reloaded. The second 32 bytes prove the ring works again.
 *
 * Output (lines end in \r\n):
 *   bus: ...                      the scan (lib/lguest_bus.c)
 *   rng: <64 hex digits>          twice
 *   rng: reset and set up again: ok
 *   rng: <n> interrupts           (0 with interrupts=0: the guest asks
 *                                 for none and polls on timer ticks)
 * exit 0; on a failure a line "rng: ..." saying what, exit 1.
 */
#include "lib/boot_params.h"
#include "lib/io.h"
#include "lib/irq.h"
#include "lib/lguest_bus.h"
#include "lib/printf.h"
#include "lib/timer.h"
#include "lib/virtqueue.h"

#define RNG_BYTES	32
#define WAIT_MS		5000

static struct virtqueue vq;
static volatile unsigned int interrupts;

static void rng_interrupt(unsigned int irq)
{
	(void)irq;
	interrupts++;	/* the waiter looks at the used ring itself */
}

static bool polling;			/* interrupts=0 on the command line */

/* ACKNOWLEDGE, DRIVER, features, the queue, DRIVER_OK. */
static bool rng_setup(struct lguest_device *dev, u32 wanted)
{
	u32 features = lguest_begin(dev, wanted);

	if (!lguest_find_vq(dev, 0, &vq, "rng/requests", features))
		return false;
	/* No interrupts wanted: vq_wait() then finds the answer on a timer
	 * tick instead (VRING_AVAIL_F_NO_INTERRUPT, or a used_event behind). */
	if (polling)
		vq_disable_interrupts(&vq);
	lguest_driver_ok(dev);
	return true;
}

/* One request: a buffer for the device to fill. */
static bool rng_read(u8 *buf)
{
	struct vq_seg seg = { buf, RNG_BYTES };
	u32 len;

	if (vq_add(&vq, NULL, 0, &seg, 1, buf, false) < 0) {
		printf("rng: the queue is full\n");
		return false;
	}
	vq_kick(&vq);
	if (!vq_wait(&vq, WAIT_MS)) {
		printf("rng: no answer from the device in %u ms\n", WAIT_MS);
		return false;
	}
	if (vq_get_used(&vq, &len) != buf) {
		printf("rng: the device gave back something else\n");
		return false;
	}
	if (len != RNG_BYTES) {
		printf("rng: asked for %u bytes, got %u\n", RNG_BYTES, len);
		return false;
	}
	return true;
}

static void print_hex(const u8 *buf)
{
	unsigned int i;

	printf("rng: ");
	for (i = 0; i < RNG_BYTES; i++)
		printf("%02x", buf[i]);
	printf("\n");
}

static bool all_zero(const u8 *buf)
{
	unsigned int i;

	for (i = 0; i < RNG_BYTES; i++)
		if (buf[i])
			return false;
	return true;
}

static bool same(const u8 *a, const u8 *b)
{
	unsigned int i;

	for (i = 0; i < RNG_BYTES; i++)
		if (a[i] != b[i])
			return false;
	return true;
}

int guest_main(struct boot_params *bp)
{
	static u8 first[RNG_BYTES], second[RNG_BYTES];
	struct lguest_device *dev;
	u32 wanted = lguest_ring_features(bp);

	polling = cmdline_get_u64(bp, "interrupts", 1) == 0;
	irq_init();
	timer_init();
	lguest_bus_scan(bp);
	dev = lguest_find_device(VIRTIO_ID_RNG, 0);
	if (!dev) {
		printf("rng: no rng device on the bus (run with --rng)\n");
		return 1;
	}
	irq_register(lguest_irq(dev), rng_interrupt);

	if (!rng_setup(dev, wanted) || !rng_read(first))
		goto failed;
	print_hex(first);

	/* Status 0: the device drops the queue and its indices; the ring
	 * pages are ours again, and rng_setup() starts them from zero. */
	lguest_reset(dev);
	if (!rng_setup(dev, wanted) || !rng_read(second))
		goto failed;
	print_hex(second);

	if (all_zero(second)) {
		printf("rng: the second read is all zeros\n");
		goto failed;
	}
	if (same(first, second)) {
		printf("rng: the second read repeats the first\n");
		goto failed;
	}
	printf("rng: reset and set up again: ok\n");
	printf("rng: %u interrupts\n", interrupts);
	return 0;

failed:
	lguest_failed(dev);
	return 1;
}
