/*
 * lguest_bus.h: the guest half of the lguest device bus.
 *
 * The launcher describes every device in one page just above our RAM,
 * at max_pfn << 12 (docs/abi.md section 3, the seed's scan_devices()):
 *
 *   struct lguest_device_desc { u8 type, num_vq, feature_len, config_len,
 *                               status; }
 *   struct lguest_vqconfig    { u16 num; u16 irq; u32 pfn; }  x num_vq
 *   u8 host_features[feature_len]     what the launcher offers
 *   u8 guest_features[feature_len]    what we accept (we write these)
 *   u8 config[config_len]             the device's config space
 *
 * packed back to back, unaligned; type 0 ends the list. Talking to a
 * device is writing into its entry and then telling the launcher with
 * LHCALL_NOTIFY(address of the entry). The data itself moves through
 * virtqueues (virtqueue.h), one or more per device, whose pages the
 * vqconfig names.
 *
 * A driver brings its device up in the virtio order:
 *   lguest_begin()      reset, ACKNOWLEDGE, DRIVER, accept features
 *   lguest_find_vq()    for each queue it uses
 *   lguest_driver_ok()  DRIVER_OK: the device starts
 */
#ifndef GUEST_LGUEST_BUS_H
#define GUEST_LGUEST_BUS_H

#include "boot_params.h"
#include "types.h"
#include "virtqueue.h"

/* Device types: the virtio IDs. */
#define VIRTIO_ID_NET		1
#define VIRTIO_ID_BLOCK		2
#define VIRTIO_ID_CONSOLE	3
#define VIRTIO_ID_RNG		4

/* Status bits (virtio legacy); 0 means reset. */
#define VIRTIO_CONFIG_S_ACKNOWLEDGE	1	/* we saw the device */
#define VIRTIO_CONFIG_S_DRIVER		2	/* we have a driver for it */
#define VIRTIO_CONFIG_S_DRIVER_OK	4	/* the driver is ready: go */
#define VIRTIO_CONFIG_S_FAILED		0x80	/* we gave up on it */

#define LGUEST_PAGE_SIZE	4096
#define LGUEST_MAX_DEVICES	32

struct lguest_device_desc {
	u8 type;
	u8 num_vq;
	u8 feature_len;		/* bytes in each of the two bitmaps */
	u8 config_len;
	u8 status;
} packed;

struct lguest_vqconfig {
	u16 num;		/* entries in the ring */
	u16 irq;		/* the device's interrupt line */
	u32 pfn;		/* the ring is at pfn << 12 */
} packed;

/* What the scan remembers about one device. */
struct lguest_device {
	unsigned int index;	/* its place in the scan: "device <index>" */
	unsigned int offset;	/* of its entry, from the start of the page */
	u64 notify_addr;	/* page + offset: LHCALL_NOTIFY for status */
	struct lguest_device_desc *desc;	/* the entry itself */
};

/*
 * Find the device page (max_pfn << 12, cross-checked against
 * lguest.devices= on the command line) and walk it, printing one line
 * per device. Returns how many devices there are; 0 if there is no
 * usable page (with a line saying why).
 */
unsigned int lguest_bus_scan(const struct boot_params *bp);

/* The nth device (from 0) of this type, or NULL. */
struct lguest_device *lguest_find_device(u8 type, unsigned int nth);

/* A name for a device type, for messages ("block"). */
const char *lguest_type_name(u8 type);

/* Features, as a 32-bit mask (bit i is byte[i / 8] bit i % 8). */
u32 lguest_host_features(const struct lguest_device *dev);
bool lguest_has_feature(const struct lguest_device *dev, unsigned int bit);
/* Write the guest feature bitmap: `wanted` minus whatever was not offered.
 * Returns what was accepted. */
u32 lguest_accept_features(struct lguest_device *dev, u32 wanted);

/* The status byte: every write is followed by LHCALL_NOTIFY(entry), as
 * the seed's set_status() does. lguest_reset() writes 0. */
u8 lguest_get_status(const struct lguest_device *dev);
void lguest_set_status(struct lguest_device *dev, u8 status);
void lguest_reset(struct lguest_device *dev);

/*
 * The virtio bring-up before the queues: reset, ACKNOWLEDGE, DRIVER, and
 * accept `wanted` & offered. Returns the accepted features. The caller
 * sets up its queues next, then calls lguest_driver_ok().
 */
u32 lguest_begin(struct lguest_device *dev, u32 wanted);
void lguest_driver_ok(struct lguest_device *dev);
void lguest_failed(struct lguest_device *dev);

/* The index-th vqconfig (copied: it is unaligned), false if none. */
bool lguest_vqconfig(const struct lguest_device *dev, unsigned int index,
		     struct lguest_vqconfig *out);

/* The device's interrupt line (its first queue's), or -1 if none. */
int lguest_irq(const struct lguest_device *dev);

/*
 * The seed's lg_find_vq(): take over the index-th queue as vq, using the
 * ring features in `features` (what lguest_begin() returned). Prints
 * where the ring is. False (with a line) if there is no such queue.
 */
bool lguest_find_vq(struct lguest_device *dev, unsigned int index,
		    struct virtqueue *vq, const char *name, u32 features);

/* Copy len bytes of config space from offset; false if out of range. */
bool lguest_config_read(const struct lguest_device *dev, unsigned int offset,
			void *buf, unsigned int len);

/*
 * The ring features a guest should ask for: both INDIRECT_DESC and
 * EVENT_IDX, unless the command line says `indirect=0` or `event_idx=0`
 * (so a test can drive the ring both ways).
 */
u32 lguest_ring_features(const struct boot_params *bp);

#endif
