/*
 * lguest_bus.c: scanning the device page and driving a device's status.
 *
 * This is the seed (lguest_device.c) without the Linux device model: the
 * same walk over the page, the same accessors for an entry's parts, the
 * same "write the status byte, then NOTIFY its address".
 *
 * The page is guest memory that the launcher wrote before we started and
 * reads whenever we notify it. The launcher keeps its own copy of
 * everything it owns, so nothing we scribble here can hurt it; but the
 * page is also all we know about the devices, so the walk checks every
 * entry fits in the page before it believes it.
 */
#include "hypercall.h"
#include "lguest_bus.h"
#include "printf.h"

static u8 *device_page;			/* NULL until a scan found it */
static struct lguest_device devices[LGUEST_MAX_DEVICES];
static unsigned int device_count;

/* --- The parts of one entry, in the order they follow each other. */

static struct lguest_vqconfig *lg_vq(const struct lguest_device_desc *desc)
{
	return (struct lguest_vqconfig *)(desc + 1);
}

static u8 *lg_features(const struct lguest_device_desc *desc)
{
	return (u8 *)(lg_vq(desc) + desc->num_vq);
}

/* The second bitmap, the one we write. */
static u8 *lg_guest_features(const struct lguest_device_desc *desc)
{
	return lg_features(desc) + desc->feature_len;
}

static u8 *lg_config(const struct lguest_device_desc *desc)
{
	return lg_features(desc) + desc->feature_len * 2;
}

static unsigned int desc_size(const struct lguest_device_desc *desc)
{
	return sizeof(*desc) + desc->num_vq * sizeof(struct lguest_vqconfig)
	       + desc->feature_len * 2 + desc->config_len;
}

const char *lguest_type_name(u8 type)
{
	switch (type) {
	case VIRTIO_ID_NET:
		return "net";
	case VIRTIO_ID_BLOCK:
		return "block";
	case VIRTIO_ID_CONSOLE:
		return "console";
	case VIRTIO_ID_RNG:
		return "rng";
	default:
		return "unknown";
	}
}

/* --- Finding the page. */

/*
 * The seed maps max_pfn << 12: the launcher lists RAM in e820 only up to
 * the page, so the first page past the highest usable RAM is it. The
 * launcher also puts lguest.devices=0x<address> on the command line for
 * drivers that cannot see max_pfn; we only use it to check.
 */
static u64 find_device_page(const struct boot_params *bp)
{
	u64 page = max_pfn(bp) << 12;
	u64 told = cmdline_get_u64(bp, "lguest.devices", 0);

	printf("bus: device page at 0x%lx (max_pfn 0x%lx)\n", page,
	       max_pfn(bp));
	if (!cmdline_get(bp, "lguest.devices"))
		printf("bus: no lguest.devices= on the command line\n");
	else if (told != page)
		printf("bus: lguest.devices=0x%lx disagrees with max_pfn << 12 "
		       "= 0x%lx; using max_pfn\n", told, page);
	return page;
}

/* --- The scan (the seed's scan_devices()). */

static void add_device(struct lguest_device_desc *d, unsigned int offset)
{
	struct lguest_device *dev = &devices[device_count];
	struct lguest_vqconfig vq;

	*dev = (struct lguest_device){
		.index = device_count,
		.offset = offset,
		.notify_addr = (u64)device_page + offset,
		.desc = d,
	};
	device_count++;

	if (lguest_vqconfig(dev, 0, &vq))
		printf("bus: device %u type %u at offset %u: %u vqs, irq %u\n",
		       dev->index, d->type, offset, d->num_vq, vq.irq);
	else
		printf("bus: device %u type %u at offset %u: %u vqs, no irq\n",
		       dev->index, d->type, offset, d->num_vq);
}

unsigned int lguest_bus_scan(const struct boot_params *bp)
{
	u64 page = find_device_page(bp);
	unsigned int offset;

	device_count = 0;
	/* We use physical addresses as pointers: only the first 4 GiB are
	 * identity mapped for us. */
	if (page == 0 || page + LGUEST_PAGE_SIZE > (1ULL << 32)) {
		printf("bus: the device page is not in the first 4 GiB; "
		       "no devices\n");
		return 0;
	}
	device_page = (u8 *)page;

	/*
	 * Entries are back to back from the start of the page; type 0 ends
	 * the list. An entry that would run past the page is not believed:
	 * there is nothing sane beyond it either.
	 */
	for (offset = 0; offset < LGUEST_PAGE_SIZE;) {
		struct lguest_device_desc *d =
			(struct lguest_device_desc *)(device_page + offset);

		if (d->type == 0)
			break;
		if (offset + sizeof(*d) > LGUEST_PAGE_SIZE ||
		    offset + desc_size(d) > LGUEST_PAGE_SIZE) {
			printf("bus: the entry at offset %u runs past the page; "
			       "scan stopped\n", offset);
			break;
		}
		if (device_count == LGUEST_MAX_DEVICES) {
			printf("bus: more than %u devices; the rest ignored\n",
			       LGUEST_MAX_DEVICES);
			break;
		}
		add_device(d, offset);
		offset += desc_size(d);
	}
	printf("bus: %u device%s\n", device_count,
	       device_count == 1 ? "" : "s");
	return device_count;
}

struct lguest_device *lguest_find_device(u8 type, unsigned int nth)
{
	unsigned int i;

	for (i = 0; i < device_count; i++)
		if (devices[i].desc->type == type && nth-- == 0)
			return &devices[i];
	return NULL;
}

/* --- Features. */

u32 lguest_host_features(const struct lguest_device *dev)
{
	const u8 *bits = lg_features(dev->desc);
	unsigned int i, n = dev->desc->feature_len;
	u32 features = 0;

	/* Byte i holds bits 8i..8i+7; we know of 32 bits at most. */
	for (i = 0; i < n && i < 4; i++)
		features |= (u32)bits[i] << (8 * i);
	return features;
}

bool lguest_has_feature(const struct lguest_device *dev, unsigned int bit)
{
	return bit < 32 && (lguest_host_features(dev) >> bit & 1);
}

u32 lguest_accept_features(struct lguest_device *dev, u32 wanted)
{
	u32 accepted = wanted & lguest_host_features(dev);
	u8 *bits = lg_guest_features(dev->desc);
	unsigned int i;

	/* The whole bitmap: bits we do not know of are bits we decline. */
	for (i = 0; i < dev->desc->feature_len; i++)
		bits[i] = i < 4 ? accepted >> (8 * i) : 0;
	return accepted;
}

/* --- Status (the seed's set_status()). */

u8 lguest_get_status(const struct lguest_device *dev)
{
	return *(volatile u8 *)&dev->desc->status;
}

void lguest_set_status(struct lguest_device *dev, u8 status)
{
	/* The byte first, then the notify that makes the launcher read it.
	 * The notify is an MMIO store, which x86 keeps in order after the
	 * ordinary store; volatile keeps gcc from moving it. */
	*(volatile u8 *)&dev->desc->status = status;
	lhcall_notify(dev->notify_addr);
}

void lguest_reset(struct lguest_device *dev)
{
	lguest_set_status(dev, 0);
}

u32 lguest_begin(struct lguest_device *dev, u32 wanted)
{
	u32 accepted;

	/* A reset first: whatever a previous driver (or a previous run of
	 * this one) left, the device forgets it, rings included. */
	lguest_reset(dev);
	lguest_set_status(dev, VIRTIO_CONFIG_S_ACKNOWLEDGE);
	lguest_set_status(dev, VIRTIO_CONFIG_S_ACKNOWLEDGE |
			       VIRTIO_CONFIG_S_DRIVER);
	accepted = lguest_accept_features(dev, wanted);
	printf("bus: %s device %u: host features 0x%08x, accepted 0x%08x\n",
	       lguest_type_name(dev->desc->type), dev->index,
	       lguest_host_features(dev), accepted);
	return accepted;
}

void lguest_driver_ok(struct lguest_device *dev)
{
	lguest_set_status(dev, lguest_get_status(dev) |
			       VIRTIO_CONFIG_S_DRIVER_OK);
}

void lguest_failed(struct lguest_device *dev)
{
	lguest_set_status(dev, lguest_get_status(dev) |
			       VIRTIO_CONFIG_S_FAILED);
}

/* --- Queues and config. */

bool lguest_vqconfig(const struct lguest_device *dev, unsigned int index,
		     struct lguest_vqconfig *out)
{
	const u8 *from;
	u8 *to = (u8 *)out;
	unsigned int i;

	if (index >= dev->desc->num_vq)
		return false;
	/* Byte by byte: the entry is unaligned (the seed memcpy()s it). */
	from = (const u8 *)(lg_vq(dev->desc) + index);
	for (i = 0; i < sizeof(*out); i++)
		to[i] = from[i];
	return true;
}

int lguest_irq(const struct lguest_device *dev)
{
	struct lguest_vqconfig vq;

	return lguest_vqconfig(dev, 0, &vq) ? vq.irq : -1;
}

bool lguest_find_vq(struct lguest_device *dev, unsigned int index,
		    struct virtqueue *vq, const char *name, u32 features)
{
	struct lguest_vqconfig cfg;

	if (!lguest_vqconfig(dev, index, &cfg)) {
		printf("bus: %s device %u has no queue %u\n",
		       lguest_type_name(dev->desc->type), dev->index, index);
		return false;
	}
	printf("bus: %s: %u entries at 0x%lx, irq %u\n", name, cfg.num,
	       (u64)cfg.pfn << 12, cfg.irq);
	return vq_init(vq, name, cfg.num, cfg.pfn,
		       features >> VIRTIO_RING_F_EVENT_IDX & 1,
		       features >> VIRTIO_RING_F_INDIRECT_DESC & 1);
}

bool lguest_config_read(const struct lguest_device *dev, unsigned int offset,
			void *buf, unsigned int len)
{
	const volatile u8 *from = lg_config(dev->desc) + offset;
	u8 *to = buf;
	unsigned int i;

	/* The seed's lg_get() BUG()s here; we just say no. */
	if (offset + len > dev->desc->config_len)
		return false;
	for (i = 0; i < len; i++)
		to[i] = from[i];
	return true;
}

u32 lguest_ring_features(const struct boot_params *bp)
{
	u32 wanted = 0;

	if (cmdline_get_u64(bp, "indirect", 1))
		wanted |= 1u << VIRTIO_RING_F_INDIRECT_DESC;
	if (cmdline_get_u64(bp, "event_idx", 1))
		wanted |= 1u << VIRTIO_RING_F_EVENT_IDX;
	return wanted;
}
