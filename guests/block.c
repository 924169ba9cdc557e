/*
 * block.c: the virtio block device, one request at a time.
 *
 * Every request is one chain: a 16-byte header the device reads
 * {u32 type; u32 ioprio; u64 sector}, the data (read by the device for a
 * write, written by it for a read), and one status byte it writes last.
 * The launcher does the I/O on its image file and answers in the used
 * ring. Data requests alternate between a direct chain (three ring
 * descriptors) and, when VIRTIO_RING_F_INDIRECT_DESC is accepted, an
 * indirect one (one ring descriptor pointing at a table of three).
 *
 * Command line:
 *   disk=N            the Nth block device on the bus (default 0)
 *   sector=S count=C  which sectors (default 0 and 8)
 *   pattern=K         mixed into the data written (default 0)
 *   mode=write        (default) write, FLUSH, read back, verify
 *   mode=read         read only, print a CRC-32 of the bytes read
 *   mode=ro-check     the disk must be read-only: a write must fail
 *   mode=storm        keep the device busy for as long as it runs: write a
 *                     marker (sector 0, the pattern) and wait for it, then
 *                     fill the ring with reads of nearly 4 GiB each (31
 *                     buffers naming the same 128 MiB of RAM, in indirect
 *                     tables: the guest needs --mem 256M and a disk of
 *                     4 GiB or more, sparse will do) and queue each again
 *                     as it completes.  Meanwhile, with
 *                     then=status (default) write the status byte again, as
 *                     a driver may while the device works; with then=reset
 *                     reset the device.  Either way the launcher must answer
 *                     at once, not when the reads are done.
 *   indirect=0, event_idx=0   decline those ring features
 *
 * The data written: byte o (0..511) of sector s is ((s * 7 + o) ^ K) & 0xff.
 * The checksum of mode=read is CRC-32 as zlib.crc32() computes it, over
 * the C * 512 bytes in order.
 *
 * Output (lines end in \r\n), after the bus lines:
 *   block: disk N: capacity <sectors> sectors (<KiB> KiB)
 *   block: features: ro <0|1> flush <0|1> blk_size <bytes|no>
 *   block: id "<id string>"              or  block: GET_ID unsupported
 *   block: flush ok                      (mode=write, FLUSH offered)
 *   block: verified C sectors at S       mode=write
 *   block: read checksum 0x%08x          mode=read
 *   block: write refused (IOERR)         mode=ro-check
 *   block: <n> requests, <m> indirect
 *   block: marker written                mode=storm, then
 *   block: storm of <n> reads of <bytes> bytes queued
 *   block: status write answered in <ms> ms   (or: reset answered in)
 * exit 0; on a failure a line "block: ..." saying what, exit 1.
 */
#include "lib/boot_params.h"
#include "lib/io.h"
#include "lib/irq.h"
#include "lib/lguest_bus.h"
#include "lib/printf.h"
#include "lib/timer.h"
#include "lib/virtqueue.h"

/* Request types, status values, features, config (virtio 0.9.5, 5.2). */
#define VIRTIO_BLK_T_IN		0
#define VIRTIO_BLK_T_OUT	1
#define VIRTIO_BLK_T_FLUSH	4
#define VIRTIO_BLK_T_GET_ID	8
#define VIRTIO_BLK_S_OK		0
#define VIRTIO_BLK_S_IOERR	1
#define VIRTIO_BLK_S_UNSUPP	2
#define VIRTIO_BLK_F_RO		5
#define VIRTIO_BLK_F_BLK_SIZE	6
#define VIRTIO_BLK_F_FLUSH	9
#define VIRTIO_BLK_CFG_CAPACITY	0	/* u64, in 512-byte sectors */
#define VIRTIO_BLK_CFG_BLK_SIZE	20	/* u32 */
#define VIRTIO_BLK_ID_BYTES	20

#define SECTOR_SIZE	512
#define CHUNK_SECTORS	8		/* sectors per request: 4 KiB */
#define WAIT_MS		10000
#define NO_STATUS	0xff		/* what the device must overwrite */

struct virtio_blk_outhdr {
	u32 type;
	u32 ioprio;
	u64 sector;
};

static struct virtqueue vq;
static struct virtio_blk_outhdr hdr;
static u8 status;
static u8 data[CHUNK_SECTORS * SECTOR_SIZE];
static unsigned int requests, indirect_requests;
static bool indirect_next = true;	/* data requests alternate */

static void block_interrupt(unsigned int irq)
{
	(void)irq;	/* vq_wait() looks at the used ring itself */
}

/*
 * One request, start to finish: build the chain, kick, sleep until the
 * device gives it back. `buf` is read by the device when !device_writes,
 * written by it otherwise. Returns the status byte, or -1 if the device
 * did not answer.
 */
static int blk_request(u32 type, u64 sector, void *buf, u32 len,
		       bool device_writes, bool use_indirect)
{
	struct vq_seg out[2], in[2];
	unsigned int n_out = 0, n_in = 0;

	hdr = (struct virtio_blk_outhdr){ .type = type, .sector = sector };
	status = NO_STATUS;

	out[n_out++] = (struct vq_seg){ &hdr, sizeof(hdr) };
	if (len && !device_writes)
		out[n_out++] = (struct vq_seg){ buf, len };
	if (len && device_writes)
		in[n_in++] = (struct vq_seg){ buf, len };
	in[n_in++] = (struct vq_seg){ &status, 1 };	/* always last */

	if (vq_add(&vq, out, n_out, in, n_in, &hdr, use_indirect) < 0) {
		printf("block: the queue is full\n");
		return -1;
	}
	requests++;
	indirect_requests += use_indirect && vq.indirect;
	vq_kick(&vq);
	if (!vq_wait(&vq, WAIT_MS) || vq_get_used(&vq, NULL) != &hdr) {
		printf("block: no answer to request type %u (sector %lu) "
		       "in %u ms\n", type, sector, WAIT_MS);
		return -1;
	}
	return status;
}

/* IN or OUT of n sectors from data[]. */
static int blk_rw(u32 type, u64 sector, unsigned int n)
{
	bool indirect = indirect_next;

	indirect_next = !indirect_next;
	return blk_request(type, sector, data, n * SECTOR_SIZE,
			   type == VIRTIO_BLK_T_IN, indirect);
}

static u8 pattern_byte(u64 sector, unsigned int offset, u64 k)
{
	return ((sector * 7 + offset) ^ k) & 0xff;
}

static void fill(u64 sector, unsigned int n, u64 k)
{
	unsigned int s, o;

	for (s = 0; s < n; s++)
		for (o = 0; o < SECTOR_SIZE; o++)
			data[s * SECTOR_SIZE + o] = pattern_byte(sector + s, o, k);
}

static bool verify(u64 sector, unsigned int n, u64 k)
{
	unsigned int s, o;

	for (s = 0; s < n; s++)
		for (o = 0; o < SECTOR_SIZE; o++) {
			u8 got = data[s * SECTOR_SIZE + o];
			u8 want = pattern_byte(sector + s, o, k);

			if (got != want) {
				printf("block: sector %lu offset %u: read 0x%02x, "
				       "wrote 0x%02x\n", sector + s, o, got, want);
				return false;
			}
		}
	return true;
}

/* --- CRC-32 (IEEE, reflected, as zlib), with a table built once. */

static u32 crc_table[256];

static void crc32_init(void)
{
	u32 i, c, bit;

	for (i = 0; i < 256; i++) {
		c = i;
		for (bit = 0; bit < 8; bit++)
			c = c & 1 ? 0xedb88320 ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

/* Continue a CRC: start with crc = 0, as zlib.crc32(data) does. */
static u32 crc32(u32 crc, const u8 *p, unsigned int n)
{
	crc = ~crc;
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* --- What the device tells us about itself. */

static void show_id(void)
{
	static char id[VIRTIO_BLK_ID_BYTES + 1];
	int st = blk_request(VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES,
			     true, false);

	/* The id is NUL-padded, but not NUL-terminated when it is 20 long:
	 * id[20] stays 0 for that. */
	if (st == VIRTIO_BLK_S_OK)
		printf("block: id \"%s\"\n", id);
	else
		printf("block: GET_ID unsupported (status %d)\n", st);
}

static bool show_config(struct lguest_device *dev, unsigned int disk,
			u64 *capacity)
{
	u32 blk_size = 0;

	if (!lguest_config_read(dev, VIRTIO_BLK_CFG_CAPACITY, capacity, 8)) {
		printf("block: the config space has no capacity\n");
		return false;
	}
	printf("block: disk %u: capacity %lu sectors (%lu KiB)\n", disk,
	       *capacity, *capacity / 2);
	if (lguest_has_feature(dev, VIRTIO_BLK_F_BLK_SIZE) &&
	    !lguest_config_read(dev, VIRTIO_BLK_CFG_BLK_SIZE, &blk_size, 4))
		blk_size = 0;
	printf("block: features: ro %d flush %d blk_size ",
	       lguest_has_feature(dev, VIRTIO_BLK_F_RO),
	       lguest_has_feature(dev, VIRTIO_BLK_F_FLUSH));
	if (blk_size)
		printf("%u\n", blk_size);
	else
		printf("no\n");
	return true;
}

/* --- The three modes that check data. */

static unsigned int chunk(u64 left)
{
	return left < CHUNK_SECTORS ? left : CHUNK_SECTORS;
}

static bool check_status(int st, const char *what, u64 sector)
{
	if (st == VIRTIO_BLK_S_OK)
		return true;
	if (st >= 0)
		printf("block: %s at sector %lu: status %d\n", what, sector, st);
	return false;
}

static bool write_and_verify(struct lguest_device *dev, u64 first, u64 count,
			     u64 k)
{
	u64 s;

	if (lguest_has_feature(dev, VIRTIO_BLK_F_RO)) {
		printf("block: the disk is read-only (use mode=ro-check)\n");
		return false;
	}
	for (s = first; s < first + count; s += chunk(first + count - s)) {
		fill(s, chunk(first + count - s), k);
		if (!check_status(blk_rw(VIRTIO_BLK_T_OUT, s,
					 chunk(first + count - s)), "write", s))
			return false;
	}
	/* FLUSH: what we wrote is on the host's disk, not just in its cache. */
	if (lguest_has_feature(dev, VIRTIO_BLK_F_FLUSH)) {
		if (!check_status(blk_request(VIRTIO_BLK_T_FLUSH, 0, NULL, 0,
					      false, false), "flush", 0))
			return false;
		printf("block: flush ok\n");
	}
	for (s = first; s < first + count; s += chunk(first + count - s)) {
		if (!check_status(blk_rw(VIRTIO_BLK_T_IN, s,
					 chunk(first + count - s)), "read", s) ||
		    !verify(s, chunk(first + count - s), k))
			return false;
	}
	printf("block: verified %lu sectors at %lu\n", count, first);
	return true;
}

static bool read_checksum(u64 first, u64 count)
{
	u32 crc = 0;
	u64 s;

	crc32_init();
	for (s = first; s < first + count; s += chunk(first + count - s)) {
		unsigned int n = chunk(first + count - s);

		if (!check_status(blk_rw(VIRTIO_BLK_T_IN, s, n), "read", s))
			return false;
		crc = crc32(crc, data, n * SECTOR_SIZE);
	}
	printf("block: read checksum 0x%08x\n", crc);
	return true;
}

static bool ro_check(struct lguest_device *dev, u64 first, u64 k)
{
	int st;

	if (!lguest_has_feature(dev, VIRTIO_BLK_F_RO)) {
		printf("block: VIRTIO_BLK_F_RO is not offered\n");
		return false;
	}
	fill(first, 1, k);
	st = blk_rw(VIRTIO_BLK_T_OUT, first, 1);
	if (st == VIRTIO_BLK_S_IOERR) {
		printf("block: write refused (IOERR)\n");
		return true;
	}
	if (st == VIRTIO_BLK_S_OK)
		printf("block: the write to a read-only disk succeeded\n");
	else if (st >= 0)
		printf("block: the write answered status %d, not IOERR\n", st);
	return false;
}

/* --- mode=storm: requests the launcher cannot finish quickly. */

#define STORM_BUFFER	0x02000000UL	/* 32 MiB: above the guest, below 256 MiB */
#define STORM_SPAN	(128u << 20)	/* bytes each buffer covers */
#define STORM_SEGS	31		/* 31 x 128 MiB: just under 2^32 bytes */
#define STORM_READS	128		/* one ring slot each: indirect */
#define STORM_HEAD_START_MS	500

static struct virtio_blk_outhdr storm_hdr[STORM_READS];
static u8 storm_status[STORM_READS];
static struct vring_desc storm_table[STORM_READS][STORM_SEGS + 2]
	__attribute__((aligned(16)));

static bool storm_queue(unsigned int i)
{
	struct vq_seg out = { &storm_hdr[i], sizeof(storm_hdr[i]) };
	struct vq_seg in[STORM_SEGS + 1];
	unsigned int s;

	storm_hdr[i] = (struct virtio_blk_outhdr){ .type = VIRTIO_BLK_T_IN };
	for (s = 0; s < STORM_SEGS; s++)
		in[s] = (struct vq_seg){ (void *)STORM_BUFFER, STORM_SPAN };
	in[STORM_SEGS] = (struct vq_seg){ &storm_status[i], 1 };
	return vq_add_in_table(&vq, storm_table[i], &out, 1, in, STORM_SEGS + 1,
			       &storm_hdr[i]) >= 0;
}

static bool storm(struct lguest_device *dev, u64 capacity, u64 k, bool reset)
{
	unsigned int i;
	u64 start;

	if (capacity < (u64)STORM_SEGS * STORM_SPAN / SECTOR_SIZE) {
		printf("block: mode=storm needs a disk of 4 GiB\n");
		return false;
	}
	if (!vq.indirect) {
		printf("block: mode=storm needs indirect descriptors\n");
		return false;
	}
	fill(0, 1, k);
	if (!check_status(blk_rw(VIRTIO_BLK_T_OUT, 0, 1), "marker write", 0))
		return false;
	printf("block: marker written\n");

	for (i = 0; i < STORM_READS; i++)
		if (!storm_queue(i)) {
			printf("block: the queue is full\n");
			return false;
		}
	vq_kick(&vq);
	printf("block: storm of %u reads of %lu bytes queued\n", STORM_READS,
	       (u64)STORM_SEGS * STORM_SPAN);

	/* Give the launcher's worker time to be well into the first read. */
	for (start = timer_ms(); timer_ms() - start < STORM_HEAD_START_MS;)
		sti_hlt();
	cli();
	start = timer_ms();
	if (reset)
		lguest_reset(dev);
	else
		lguest_set_status(dev, lguest_get_status(dev));
	printf("block: %s answered in %lu ms\n",
	       reset ? "reset" : "status write", timer_ms() - start);
	if (reset)
		halt_forever();		/* only the launcher can end us now */

	for (;;) {			/* keep it busy: each read goes again */
		struct virtio_blk_outhdr *done;

		vq_wait(&vq, 0);
		while ((done = vq_get_used(&vq, NULL)) != NULL) {
			storm_queue(done - storm_hdr);
			vq_kick(&vq);
		}
	}
}

int guest_main(struct boot_params *bp)
{
	unsigned int disk = cmdline_get_u64(bp, "disk", 0);
	u64 first = cmdline_get_u64(bp, "sector", 0);
	u64 count = cmdline_get_u64(bp, "count", CHUNK_SECTORS);
	u64 k = cmdline_get_u64(bp, "pattern", 0);
	u32 wanted = lguest_ring_features(bp) | 1u << VIRTIO_BLK_F_RO |
		     1u << VIRTIO_BLK_F_BLK_SIZE | 1u << VIRTIO_BLK_F_FLUSH;
	struct lguest_device *dev;
	u64 capacity;
	u32 features;
	bool ok;

	irq_init();
	timer_init();
	lguest_bus_scan(bp);
	dev = lguest_find_device(VIRTIO_ID_BLOCK, disk);
	if (!dev) {
		printf("block: no block device %u on the bus "
		       "(run with --block PATH)\n", disk);
		return 1;
	}
	irq_register(lguest_irq(dev), block_interrupt);

	features = lguest_begin(dev, wanted);
	if (!lguest_find_vq(dev, 0, &vq, "block/requests", features))
		goto failed;
	lguest_driver_ok(dev);

	if (!show_config(dev, disk, &capacity))
		goto failed;
	show_id();

	if (count == 0 || first >= capacity || count > capacity - first) {
		printf("block: sectors %lu..%lu are not on a disk of %lu\n",
		       first, first + count - 1, capacity);
		goto failed;
	}
	if (cmdline_is(bp, "mode", "read"))
		ok = read_checksum(first, count);
	else if (cmdline_is(bp, "mode", "ro-check"))
		ok = ro_check(dev, first, k);
	else if (cmdline_is(bp, "mode", "storm"))
		ok = storm(dev, capacity, k, cmdline_is(bp, "then", "reset"));
	else if (!cmdline_get(bp, "mode") || cmdline_is(bp, "mode", "write"))
		ok = write_and_verify(dev, first, count, k);
	else {
		printf("block: unknown mode (write, read, ro-check, storm)\n");
		ok = false;
	}
	printf("block: %u requests, %u indirect\n", requests,
	       indirect_requests);
	if (ok)
		return 0;

failed:
	lguest_failed(dev);
	return 1;
}
