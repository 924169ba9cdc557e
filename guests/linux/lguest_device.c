// SPDX-License-Identifier: GPL-2.0
/*P:050 Lguest guests use a very simple method to describe devices.  It's a
 * series of device descriptors contained just above the top of normal Guest
 * memory.
 *
 * We use the standard "virtio" device infrastructure, which provides us with a
 * console, a network, a block and an entropy driver.  Each one expects some
 * configuration information and a "virtqueue" or two to send and receive
 * data.
 */
/*:*/
/*
 * This is the lguest guest's device driver of Linux 2.6.31
 * (drivers/lguest/lguest_device.c), ported to the virtio API of Linux 6.1
 * for pylguest, a launcher that runs lguest's device protocol on KVM.  The
 * structure and the tour comments (the P:, D: marks) are the original's; what
 * changed is said where it changed:
 *
 *  - There is no lguest hypervisor underneath any more, so no "lguest"
 *    paravirt ops to recognise and no max_pfn to find the page with: the
 *    launcher says where the page is on the command line (lguest.devices=).
 *  - A hypercall is now an 8-byte store into the launcher's hypercall page,
 *    which KVM hands to the launcher (or, for a kick, to an ioeventfd).
 *  - Interrupts are ordinary ISA lines (the launcher describes them in an
 *    MP table, so they arrive through the IOAPIC).
 *  - Shutting down is ours to do too: power-off, halt, restart and panic
 *    each tell the launcher, so that it can stop and say why.
 */
#include <linux/device.h>
#include <linux/err.h>
#include <linux/init.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/panic_notifier.h>
#include <linux/reboot.h>
#include <linux/slab.h>
#include <linux/syscore_ops.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>

/*
 * The contract with the launcher.  These used to live in
 * <linux/lguest_launcher.h> and <asm/lguest_hcall.h>, which left Linux with
 * lguest in 4.14; the launcher's side is pylguest's device_page.py and
 * hypercall.py.
 */
struct lguest_device_desc {
	/* The device type: console, network, disk etc.  Type 0 terminates. */
	__u8 type;
	/* The number of virtqueues (first in config array) */
	__u8 num_vq;
	/*
	 * The number of bytes of feature bits.  Multiply by 2: one for host
	 * features and one for Guest acknowledgements.
	 */
	__u8 feature_len;
	/* The number of bytes of the config array after virtqueues. */
	__u8 config_len;
	/* A status byte, written by the Guest. */
	__u8 status;
	__u8 config[];
} __packed;

struct lguest_vqconfig {
	/* The number of entries in the virtio_ring */
	__u16 num;
	/* The interrupt we get when something happens. */
	__u16 irq;
	/* The page number of the virtio ring for this device. */
	__u32 pfn;
} __packed;

#define LGUEST_VRING_ALIGN	PAGE_SIZE

/* The hypercall page: every 8-byte store to it exits to the launcher. */
#define LGUEST_HCALL_PAGE	0xFEB00000UL
#define LHCALL_NOTIFY		0x00	/* argument: a guest-physical address */
#define LHCALL_SHUTDOWN		0x08	/* argument: status and how, below */

#define LHCALL_SHUTDOWN_REBOOT	0x100	/* restart (the launcher just stops) */
#define LHCALL_SHUTDOWN_HALT	0x200	/* halted: no exit status to give */
#define LHCALL_SHUTDOWN_PANIC	0x400	/* the kernel panicked */

/* Where the launcher put the device page: "lguest.devices=0x...". */
static unsigned long devices;
module_param(devices, ulong, 0444);
MODULE_PARM_DESC(devices, "guest-physical address of the lguest device page");

/*
 * What LHCALL_SHUTDOWN reports when this kernel powers off.  An init that
 * runs one command writes the command's exit status here, then powers off,
 * and the launcher exits with it.
 */
static u8 exit_status;
module_param(exit_status, byte, 0644);
MODULE_PARM_DESC(exit_status, "exit status the launcher reports at power-off (0-255)");

/* The pointer to our (page) of device descriptions. */
static void *lguest_devices;

/* The hypercall page, mapped uncached: stores must reach the launcher. */
static void __iomem *lguest_hcall_page;

static void lguest_hcall(unsigned long call, u64 arg)
{
	/* One 8-byte store: the launcher's ioeventfds match exactly that. */
	writeq(arg, lguest_hcall_page + call);
}

/*
 * For Guests, device memory can be used as normal memory, so we map it
 * cached.  memremap() is what ioremap_cache() became; the page and the rings
 * are RAM the launcher shares with us, not registers.
 */
static inline void *lguest_map(unsigned long phys_addr, unsigned long pages)
{
	return memremap(phys_addr, PAGE_SIZE * pages, MEMREMAP_WB);
}

static inline void lguest_unmap(void *addr)
{
	memunmap(addr);
}

/*D:100 Each lguest device is just a virtio device plus a pointer to its entry
 * in the lguest_devices page.
 */
struct lguest_device {
	struct virtio_device vdev;

	/* The entry in the lguest_devices page for this device. */
	struct lguest_device_desc *desc;
};

/* Since the virtio infrastructure hands us a pointer to the virtio_device all
 * the time, it helps to have a curt macro to get a pointer to the struct
 * lguest_device it's enclosed in.
 */
#define to_lgdev(vd) container_of(vd, struct lguest_device, vdev)

/*D:130
 * Device configurations
 *
 * The configuration information for a device consists of one or more
 * virtqueues, a feature bitmap, and some configuration bytes.  The
 * configuration bytes don't really matter to us: the Launcher sets them up, and
 * the driver will look at them during setup.
 *
 * A convenient routine to return the device's virtqueue config array:
 * immediately after the descriptor.
 */
static struct lguest_vqconfig *lg_vq(const struct lguest_device_desc *desc)
{
	return (void *)(desc + 1);
}

/* The features come immediately after the virtqueues. */
static u8 *lg_features(const struct lguest_device_desc *desc)
{
	return (void *)(lg_vq(desc) + desc->num_vq);
}

/* The config space comes after the two feature bitmasks. */
static u8 *lg_config(const struct lguest_device_desc *desc)
{
	return lg_features(desc) + desc->feature_len * 2;
}

/* The total size of the config page used by this device (incl. desc) */
static unsigned int desc_size(const struct lguest_device_desc *desc)
{
	return sizeof(*desc)
		+ desc->num_vq * sizeof(struct lguest_vqconfig)
		+ desc->feature_len * 2
		+ desc->config_len;
}

/*
 * This gets the device's feature bits.  Features are 64 bits wide now
 * (virtio 1.0 numbers them past 32), so we read up to 64 of them.
 */
static u64 lg_get_features(struct virtio_device *vdev)
{
	unsigned int i;
	u64 features = 0;
	struct lguest_device_desc *desc = to_lgdev(vdev)->desc;
	u8 *in_features = lg_features(desc);

	/* We do this the slow but generic way. */
	for (i = 0; i < min(desc->feature_len * 8, 64); i++)
		if (in_features[i / 8] & (1 << (i % 8)))
			features |= BIT_ULL(i);

	return features;
}

/* The virtio core takes the features the Host offers, and copies the
 * ones supported by the driver into vdev->features.  Once that's all
 * sorted out, this routine is called so we can tell the Host which
 * features we understand and accept.  It may fail now; ours cannot.
 */
static int lg_finalize_features(struct virtio_device *vdev)
{
	unsigned int i, bits;
	struct lguest_device_desc *desc = to_lgdev(vdev)->desc;
	/* Second half of bitmap is features we accept. */
	u8 *out_features = lg_features(desc) + desc->feature_len;

	/* Give virtio_ring a chance to accept features. */
	vring_transport_features(vdev);

	/* vdev->features is a u64 these days, not a Linux bitmap, but the
	 * lguest layout is still a simple array of bytes: so we do this
	 * slow, manual conversion which is completely general.
	 */
	memset(out_features, 0, desc->feature_len);
	bits = min_t(unsigned int, desc->feature_len, sizeof(vdev->features)) * 8;
	for (i = 0; i < bits; i++) {
		if (vdev->features & BIT_ULL(i))
			out_features[i / 8] |= (1 << (i % 8));
	}
	return 0;
}

/* Once they've found a field, getting a copy of it is easy. */
static void lg_get(struct virtio_device *vdev, unsigned int offset,
		   void *buf, unsigned int len)
{
	struct lguest_device_desc *desc = to_lgdev(vdev)->desc;

	/* Check they didn't ask for more than the length of the config!  The
	 * seed said BUG_ON(); reading zeroes is kinder to the kernel.
	 */
	if (WARN_ON_ONCE(offset + len > desc->config_len)) {
		memset(buf, 0, len);
		return;
	}
	memcpy(buf, lg_config(desc) + offset, len);
}

/* Setting the contents is also trivial. */
static void lg_set(struct virtio_device *vdev, unsigned int offset,
		   const void *buf, unsigned int len)
{
	struct lguest_device_desc *desc = to_lgdev(vdev)->desc;

	/* Check they didn't ask for more than the length of the config! */
	if (WARN_ON_ONCE(offset + len > desc->config_len))
		return;
	memcpy(lg_config(desc) + offset, buf, len);
}

/* The operations to get and set the status word just access the status field
 * of the device descriptor.
 */
static u8 lg_get_status(struct virtio_device *vdev)
{
	return to_lgdev(vdev)->desc->status;
}

/* To notify on status updates, we (ab)use the NOTIFY hypercall, with the
 * descriptor address of the device.  A zero status means "reset".
 */
static void set_status(struct virtio_device *vdev, u8 status)
{
	unsigned long offset = (void *)to_lgdev(vdev)->desc - lguest_devices;

	/* We set the status. */
	to_lgdev(vdev)->desc->status = status;
	lguest_hcall(LHCALL_NOTIFY, devices + offset);
}

static void lg_set_status(struct virtio_device *vdev, u8 status)
{
	/* The virtio core resets through lg_reset(), never with status 0. */
	WARN_ON_ONCE(!status);
	set_status(vdev, status);
}

/*
 * The launcher handles the reset while our store is still exiting to it, so
 * when set_status() returns the device has stopped touching its rings: that
 * is what the virtio core now asks of a reset.
 */
static void lg_reset(struct virtio_device *vdev)
{
	set_status(vdev, 0);
}

/*
 * Virtqueues
 *
 * The other piece of infrastructure virtio needs is a "virtqueue": a way of
 * the Guest device registering buffers for the other side to read from or
 * write into (ie. send and receive buffers).  Each device can have multiple
 * virtqueues: for example the console driver uses one queue for sending and
 * another for receiving.
 *
 * Fortunately for us, a very fast shared-memory-plus-descriptors virtqueue
 * already exists in virtio_ring.c.  We just need to connect it up.
 *
 * We start with the information we need to keep about each virtqueue.
 */

/*D:140 This is the information we remember about each virtqueue. */
struct lguest_vq_info {
	/* A copy of the information contained in the device config. */
	struct lguest_vqconfig config;

	/* The address where we mapped the virtio ring, so we can unmap it. */
	void *pages;
};

/* When the virtio_ring code wants to prod the Host, it calls us here and we
 * make a hypercall.  We hand the physical address of the virtqueue so the Host
 * knows which virtqueue we're talking about.  (On KVM the launcher registers
 * that very store as an ioeventfd: the kick wakes the device's thread
 * without leaving the kernel.)
 */
static bool lg_notify(struct virtqueue *vq)
{
	/* We store our virtqueue information in the "priv" pointer of the
	 * virtqueue structure.
	 */
	struct lguest_vq_info *lvq = vq->priv;

	lguest_hcall(LHCALL_NOTIFY, (u64)lvq->config.pfn << PAGE_SHIFT);
	return true;
}

/* This routine finds the Nth virtqueue described in the configuration of
 * this device and sets it up.
 *
 * This is kind of an ugly duckling.  It'd be nicer to have a standard
 * representation of a virtqueue in the configuration space, but it seems that
 * everyone wants to do it differently.  The KVM coders want the Guest to
 * allocate its own pages and tell the Host where they are, but for lguest it's
 * simpler for the Host to simply tell us where the pages are.
 *
 * So we provide drivers with a "find the Nth virtqueue and set it up"
 * function.
 */
static struct virtqueue *lg_find_vq(struct virtio_device *vdev,
				    unsigned int index,
				    void (*callback)(struct virtqueue *vq),
				    const char *name, bool ctx)
{
	struct lguest_device *ldev = to_lgdev(vdev);
	struct lguest_vq_info *lvq;
	struct virtqueue *vq;
	int err;

	/* We must have this many virtqueues. */
	if (index >= ldev->desc->num_vq)
		return ERR_PTR(-ENOENT);

	lvq = kmalloc(sizeof(*lvq), GFP_KERNEL);
	if (!lvq)
		return ERR_PTR(-ENOMEM);

	/* Make a copy of the "struct lguest_vqconfig" entry, which sits after
	 * the descriptor.  We need a copy because the config space might not
	 * be aligned correctly.
	 */
	memcpy(&lvq->config, lg_vq(ldev->desc) + index, sizeof(lvq->config));

	/* virtio_ring.c indexes the ring with "& (num - 1)": a ring whose
	 * size is not a power of two would be walked wrongly, so refuse it.
	 */
	if (!is_power_of_2(lvq->config.num) || !lvq->config.pfn) {
		dev_err(&vdev->dev, "virtqueue %u: bad ring (num %u, pfn 0x%x)\n",
			index, lvq->config.num, lvq->config.pfn);
		err = -EINVAL;
		goto free_lvq;
	}

	dev_dbg(&vdev->dev, "mapping virtqueue %u at 0x%llx\n", index,
		(u64)lvq->config.pfn << PAGE_SHIFT);
	/* Figure out how many pages the ring will take, and map that memory */
	lvq->pages = lguest_map((unsigned long)lvq->config.pfn << PAGE_SHIFT,
				DIV_ROUND_UP(vring_size(lvq->config.num,
							LGUEST_VRING_ALIGN),
					     PAGE_SIZE));
	if (!lvq->pages) {
		err = -ENOMEM;
		goto free_lvq;
	}

	/* OK, tell virtio_ring.c to set up a virtqueue now we know its size
	 * and we've got a pointer to its pages.  The launcher is a CPU like
	 * us, so ordinary SMP barriers ("weak barriers") are enough.
	 */
	vq = vring_new_virtqueue(index, lvq->config.num, LGUEST_VRING_ALIGN,
				 vdev, true, ctx, lvq->pages, lg_notify,
				 callback, name);
	if (!vq) {
		err = -ENOMEM;
		goto unmap;
	}

	/* We hook up our "struct lguest_vq_info" to the virtqueue's priv
	 * pointer before any interrupt or notify can want it.
	 */
	vq->priv = lvq;

	/* Tell the interrupt for this virtqueue to go to the virtio_ring
	 * interrupt handler.  All of a device's queues share its line, and
	 * vring_interrupt() says IRQ_NONE for a queue with nothing new.
	 * (No more lguest_setup_irq(): the line is a plain ISA interrupt,
	 * which Linux set up when it read the launcher's MP table.)
	 */
	/*
	 * The seed wished here for the old flag with which the Host said the
	 * interrupt could feed the entropy pool.  The wish is granted another
	 * way now: the launcher's virtio rng device feeds it directly.
	 */
	err = request_irq(lvq->config.irq, vring_interrupt, IRQF_SHARED,
			  dev_name(&vdev->dev), vq);
	if (err)
		goto destroy_vring;

	return vq;

destroy_vring:
	vring_del_virtqueue(vq);
unmap:
	lguest_unmap(lvq->pages);
free_lvq:
	kfree(lvq);
	return ERR_PTR(err);
}
/*:*/

/* Cleaning up a virtqueue is easy */
static void lg_del_vq(struct virtqueue *vq)
{
	struct lguest_vq_info *lvq = vq->priv;

	/* Release the interrupt */
	free_irq(lvq->config.irq, vq);
	/* Tell virtio_ring.c to free the virtqueue. */
	vring_del_virtqueue(vq);
	/* Unmap the pages containing the ring. */
	lguest_unmap(lvq->pages);
	/* Free our own queue information. */
	kfree(lvq);
}

static void lg_del_vqs(struct virtio_device *vdev)
{
	struct virtqueue *vq, *n;

	list_for_each_entry_safe(vq, n, &vdev->vqs, list)
		lg_del_vq(vq);
}

/*
 * Drivers now ask for all their queues at once, may leave some unnamed (a
 * queue they do not use: it gets no virtqueue, and does not use up an index
 * of ours), and may ask for a per-buffer context ("ctx").
 */
static int lg_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
		       struct virtqueue *vqs[],
		       vq_callback_t *callbacks[],
		       const char * const names[],
		       const bool *ctx,
		       struct irq_affinity *desc)
{
	struct lguest_device *ldev = to_lgdev(vdev);
	unsigned int i, queue_idx = 0;

	/* We must have this many virtqueues. */
	if (nvqs > ldev->desc->num_vq)
		return -ENOENT;

	for (i = 0; i < nvqs; ++i) {
		if (!names[i]) {
			vqs[i] = NULL;
			continue;
		}
		vqs[i] = lg_find_vq(vdev, queue_idx++, callbacks[i], names[i],
				    ctx ? ctx[i] : false);
		if (IS_ERR(vqs[i]))
			goto error;
	}
	return 0;

error:
	lg_del_vqs(vdev);
	return PTR_ERR(vqs[i]);
}

/*
 * The virtio core asks a transport to wait until every interrupt handler
 * that might still be running for this device has finished.
 */
static void lg_synchronize_cbs(struct virtio_device *vdev)
{
	struct virtqueue *vq;

	list_for_each_entry(vq, &vdev->vqs, list) {
		struct lguest_vq_info *lvq = vq->priv;

		synchronize_irq(lvq->config.irq);
	}
}

static const char *lg_bus_name(struct virtio_device *vdev)
{
	return "lguest";
}

/* The ops structure which hooks everything together. */
static const struct virtio_config_ops lguest_config_ops = {
	.get_features = lg_get_features,
	.finalize_features = lg_finalize_features,
	.get = lg_get,
	.set = lg_set,
	.get_status = lg_get_status,
	.set_status = lg_set_status,
	.reset = lg_reset,
	.find_vqs = lg_find_vqs,
	.del_vqs = lg_del_vqs,
	.synchronize_cbs = lg_synchronize_cbs,
	.bus_name = lg_bus_name,
};

/* The root device for the lguest virtio devices.  This makes them appear as
 * /sys/devices/lguest/0,1,2 not /sys/devices/0,1,2.
 */
static struct device *lguest_root;

/*
 * The device core frees a device when its last reference goes, which may be
 * later than unregister_virtio_device(): so the memory is freed here.
 */
static void lguest_release_device(struct device *dev)
{
	struct virtio_device *vdev = dev_to_virtio(dev);

	kfree(to_lgdev(vdev));
}

/*D:120 This is the core of the lguest bus: actually adding a new device.
 * It's a separate function because it's neater that way, and because an
 * earlier version of the code supported hotplug and unplug.  They were removed
 * early on because they were never used.
 *
 * As Andrew Tridgell says, "Untested code is buggy code".
 *
 * It's worth reading this carefully: we start with a pointer to the new device
 * descriptor in the "lguest_devices" page, and the offset into the device
 * descriptor page so we can uniquely identify it if things go badly wrong.
 */
static void add_lguest_device(struct lguest_device_desc *d,
			      unsigned int offset)
{
	struct lguest_device *ldev;

	/* Start with zeroed memory; Linux's device layer counts on it. */
	ldev = kzalloc(sizeof(*ldev), GFP_KERNEL);
	if (!ldev)
		return;

	/* This devices' parent is the lguest/ dir. */
	ldev->vdev.dev.parent = lguest_root;
	ldev->vdev.dev.release = lguest_release_device;
	/* The device type is the virtio ID; the index comes from the core. */
	ldev->vdev.id.device = d->type;
	/* We have a simple set of routines for querying the device's
	 * configuration information and setting its status.
	 */
	ldev->vdev.config = &lguest_config_ops;
	/* And we remember the device's descriptor for lguest_config_ops. */
	ldev->desc = d;

	/* register_virtio_device() sets up the generic fields for the struct
	 * virtio_device and calls device_register().  This makes the bus
	 * infrastructure look for a matching driver.  Once it has run, the
	 * device has a reference count: a failure is undone by dropping our
	 * reference, which frees ldev through lguest_release_device().
	 */
	if (register_virtio_device(&ldev->vdev) != 0) {
		pr_err("lguest: failed to register device at %u (type %u)\n",
		       offset, d->type);
		put_device(&ldev->vdev.dev);
	}
}

/*D:110 scan_devices() simply iterates through the device page.  The type 0 is
 * reserved to mean "end of devices".
 *
 * The seed trusted the page completely.  We still trust the launcher, but a
 * mangled page should cost us a message, not a read off the end of the
 * mapping: so each entry must fit in the page before we believe it.
 */
static void scan_devices(void)
{
	unsigned int i;
	struct lguest_device_desc *d;

	/* We start at the page beginning, and skip over each entry. */
	for (i = 0; i + sizeof(*d) <= PAGE_SIZE; i += desc_size(d)) {
		d = lguest_devices + i;

		/* Once we hit a zero, stop. */
		if (d->type == 0)
			break;

		if (i + desc_size(d) > PAGE_SIZE) {
			pr_err("lguest: device at %u (size %u) runs off the page\n",
			       i, desc_size(d));
			break;
		}
		pr_debug("lguest: device at %u has size %u\n", i, desc_size(d));
		add_lguest_device(d, i);
	}
}

/*
 * Stopping.  With real hardware, "power off" pokes a register on the
 * motherboard; our motherboard is the launcher, and LHCALL_SHUTDOWN tells it
 * the run is over.  The launcher exits with the status in the low byte, so
 * the init that ran a command (see guests/linux/init) writes the command's
 * status to exit_status, then powers off.  A halt, a restart and a panic are
 * reported as such, so nobody mistakes them for a command's status.
 *
 * Linux stops in three ways (kernel/reboot.c): power off, halt and restart.
 * Each first shuts the devices down, then runs the syscore shutdown hooks,
 * and only then does the machine-specific part.  We speak up from that
 * hook, for all three: the devices are done and the disks flushed by then,
 * and the kernel has not yet printed "Power down" after a command's output.
 */
static void lguest_syscore_shutdown(void)
{
	switch (system_state) {
	case SYSTEM_POWER_OFF:
		lguest_hcall(LHCALL_SHUTDOWN, exit_status);
		break;
	case SYSTEM_HALT:
		/*
		 * A halt would stop the CPU with interrupts off, which a
		 * launcher can only wait out.
		 */
		lguest_hcall(LHCALL_SHUTDOWN, LHCALL_SHUTDOWN_HALT);
		break;
	case SYSTEM_RESTART:
		lguest_hcall(LHCALL_SHUTDOWN, LHCALL_SHUTDOWN_REBOOT);
		break;
	default:
		break;
	}
}

static struct syscore_ops lguest_syscore_ops = {
	.shutdown = lguest_syscore_shutdown,
};

/*
 * The kernel turns "power off" into "halt" unless some handler says it can
 * power the machine off, so we register one.  It is also the way out for a
 * power-off that skips the syscore hooks.
 */
static int lguest_power_off(struct sys_off_data *data)
{
	lguest_hcall(LHCALL_SHUTDOWN, exit_status);
	return NOTIFY_DONE;
}

/* panic() prints its message first, then calls us. */
static int lguest_panic(struct notifier_block *nb, unsigned long event,
			void *message)
{
	lguest_hcall(LHCALL_SHUTDOWN, LHCALL_SHUTDOWN_PANIC);
	return NOTIFY_DONE;
}

static struct notifier_block lguest_panic_nb = {
	.notifier_call = lguest_panic,
};

static struct sys_off_handler *lguest_power_off_handler;

static int lguest_stop_handlers_register(void)
{
	lguest_power_off_handler =
		register_sys_off_handler(SYS_OFF_MODE_POWER_OFF,
					 SYS_OFF_PRIO_DEFAULT,
					 lguest_power_off, NULL);
	if (IS_ERR(lguest_power_off_handler))
		return PTR_ERR(lguest_power_off_handler);

	register_syscore_ops(&lguest_syscore_ops);
	atomic_notifier_chain_register(&panic_notifier_list, &lguest_panic_nb);
	return 0;
}

static void lguest_stop_handlers_unregister(void)
{
	atomic_notifier_chain_unregister(&panic_notifier_list, &lguest_panic_nb);
	unregister_syscore_ops(&lguest_syscore_ops);
	unregister_sys_off_handler(lguest_power_off_handler);
}

/*D:105 Fairly early in boot, lguest_devices_init() is called to set up the
 * lguest device infrastructure.  The seed checked that we are a Guest by
 * checking pv_info.name; today nothing in the CPU says "lguest", and the
 * launcher tells us instead, with lguest.devices= on the command line: no
 * address, no lguest.
 *
 * So we can access the "struct lguest_device_desc"s easily, we map that memory
 * and store the pointer in the global "lguest_devices".  We map the hypercall
 * page, and register our ways of stopping.  Then we register a root device
 * from which all our devices will hang (this seems to be the correct sysfs
 * incantation).
 *
 * Finally we call scan_devices() which adds all the devices found in the
 * lguest_devices page.
 */
static int __init lguest_devices_init(void)
{
	int err;

	if (!devices)
		return -ENODEV;
	if (!PAGE_ALIGNED(devices)) {
		pr_err("lguest: device page 0x%lx is not page aligned\n",
		       devices);
		return -EINVAL;
	}

	/* Devices are in a single page above top of "normal" mem */
	lguest_devices = lguest_map(devices, 1);
	if (!lguest_devices)
		return -ENOMEM;

	lguest_hcall_page = ioremap(LGUEST_HCALL_PAGE, PAGE_SIZE);
	if (!lguest_hcall_page) {
		err = -ENOMEM;
		goto unmap_devices;
	}

	err = lguest_stop_handlers_register();
	if (err)
		goto unmap_hcall;

	lguest_root = root_device_register("lguest");
	if (IS_ERR(lguest_root)) {
		err = PTR_ERR(lguest_root);
		goto unregister_handlers;
	}

	scan_devices();
	pr_info("lguest: device page at 0x%lx\n", devices);
	return 0;

unregister_handlers:
	lguest_stop_handlers_unregister();
unmap_hcall:
	iounmap(lguest_hcall_page);
unmap_devices:
	lguest_unmap(lguest_devices);
	return err;
}
/* We do this after core stuff, but before the drivers. */
postcore_initcall(lguest_devices_init);

/* As a module we can also go away again: devices first, then the rest. */
static int lguest_unregister_child(struct device *dev, void *unused)
{
	unregister_virtio_device(dev_to_virtio(dev));
	return 0;
}

static void __exit lguest_devices_exit(void)
{
	device_for_each_child(lguest_root, NULL, lguest_unregister_child);
	root_device_unregister(lguest_root);
	lguest_stop_handlers_unregister();
	iounmap(lguest_hcall_page);
	lguest_unmap(lguest_devices);
}
module_exit(lguest_devices_exit);

MODULE_DESCRIPTION("lguest device bus for pylguest guests");
MODULE_LICENSE("GPL");

/*D:150 At this point in the journey we used to now wade through the lguest
 * devices themselves: net, block and console.  Since they're all now virtio
 * devices rather than lguest-specific, I've decided to ignore them.  Mostly,
 * they're kind of boring.  But this does mean you'll never experience the
 * thrill of reading the forbidden love scene buried deep in the block driver.
 *
 * "make Launcher" beckons, where we answer questions like "Where do Guests
 * come from?", and "What do you do when someone asks for optimization?".
 */
