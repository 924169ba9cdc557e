/*
 * run_fast.c: the exits the run loop answers without Python.
 *
 * Most exits a guest makes are the same few port accesses, over and over:
 * a serial console costs two per character (read LSR until THR is empty,
 * write the byte to THR), and a probe of absent hardware reads ports that
 * nobody claims.  A trip through Python for each costs more than the exit
 * itself, so pyl_run_fast() loops on KVM_RUN here and answers those in C.
 * Everything else -- and a stop request (EINTR) -- goes back to Python with
 * the exit left in kvm_run, exactly as a plain KVM_RUN would have left it.
 *
 * C never decides anything the Python model has not decided first.  The
 * port bus publishes which ports are claimed; the UART publishes, whenever
 * it changes, whether a THR write is nothing but output and what LSR reads
 * as (struct pyl_fast, in pylguest.h).  When a rule does not hold, C hands the exit
 * to Python, which answers it with the full model.
 *
 * The bytes taken from THR go into a ring that Python empties into the
 * console (launcher/pylguest/run/fastpath.py): before it handles any exit C
 * hands back, so output stays in order, and from a thread woken by
 * kick_fd, because a guest that prints a prompt and halts makes no more
 * exits that would carry it out.  A full ring is one more rule that does
 * not hold: the write goes to Python, which waits for room in the console
 * (back pressure, giving way to a stop) as it always did.
 */

#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>

#include "pylguest.h"

#define UART_THR	0		/* offsets from the UART's base port */
#define UART_LSR	5

/* Python's thread may change these at any time (the input thread sets LSR.DR). */
#define READ_ONCE(x)	__atomic_load_n(&(x), __ATOMIC_RELAXED)

static int port_claimed(const struct pyl_fast *fp, uint16_t port)
{
	return fp->claimed[port >> 3] & (1 << (port & 7));
}

/*
 * Wake Python's console thread, once per batch: it clears out_kicked when
 * it takes the bytes.  The exchange here and the one in pyl_fast_take()
 * are full barriers, so either we see the flag clear and kick, or Python's
 * take comes after our bytes and carries them.
 */
static void kick(struct pyl_fast *fp)
{
	uint64_t one = 1;

	if (fp->kick_fd >= 0 && !__atomic_exchange_n(&fp->out_kicked, 1, __ATOMIC_SEQ_CST))
		(void)!write(fp->kick_fd, &one, sizeof(one));
}

/* `count` bytes out of THR, into the ring; 0 if there is no room. */
static int uart_transmit(struct pyl_fast *fp, const uint8_t *data, uint32_t count)
{
	uint32_t head = fp->out_head;
	uint32_t tail = __atomic_load_n(&fp->out_tail, __ATOMIC_ACQUIRE);
	uint32_t i;

	if (PYL_FAST_RING_SIZE - (head - tail) < count)
		return 0;
	for (i = 0; i < count; i++)
		fp->out[(head + i) % PYL_FAST_RING_SIZE] = data[i];
	__atomic_store_n(&fp->out_head, head + count, __ATOMIC_RELEASE);
	kick(fp);
	return 1;
}

static int answer_io(struct pyl_fast *fp, struct kvm_run *run)
{
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	uint16_t port = run->io.port;
	int out = run->io.direction == KVM_EXIT_IO_OUT;
	uint8_t lsr;

	/*
	 * A port nobody claims is a floating ISA bus: writes vanish, reads
	 * see all ones, whatever the size and count (ports.py's rule: only
	 * the first port of a wide access decides, as there).
	 */
	if (!port_claimed(fp, port)) {
		if (!out)
			memset(data, 0xff, run->io.size * run->io.count);
		return 1;
	}
	if (run->io.size != 1)
		return 0;
	if (out && port == fp->uart_base + UART_THR && READ_ONCE(fp->uart_thr_plain))
		return uart_transmit(fp, data, run->io.count);
	if (!out && port == fp->uart_base + UART_LSR) {
		lsr = READ_ONCE(fp->uart_lsr);
		if (!lsr)
			return 0;
		memset(data, lsr, run->io.count);	/* reading LSR changes nothing */
		return 1;
	}
	return 0;
}

/* 1 if the exit now in `run` was answered here, 0 if it is Python's. */
int pyl_fast_answer(struct pyl_fast *fp, struct kvm_run *run)
{
	if (run->exit_reason != KVM_EXIT_IO || !answer_io(fp, run))
		return 0;
	fp->answered[KVM_EXIT_IO]++;
	return 1;
}

/*
 * KVM_RUN until an exit that Python must answer: 0 with it in kvm_run, or
 * -1 with errno (EINTR, EAGAIN: a signal or immediate_exit, a stop request
 * perhaps; pyl_run's errors otherwise).  A stop asked for while we answer
 * an exit here sets immediate_exit, so the next KVM_RUN returns at once.
 */
int pyl_run_fast(int vcpu_fd, struct kvm_run *run, struct pyl_fast *fp)
{
	for (;;) {
		if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
			return -1;
		if (!pyl_fast_answer(fp, run))
			return 0;
	}
}

/*
 * Python's side of the ring: up to `size` bytes into `buf`, oldest first.
 * One caller at a time (run/fastpath.py holds a lock).
 */
uint32_t pyl_fast_take(struct pyl_fast *fp, uint8_t *buf, uint32_t size)
{
	uint32_t tail = fp->out_tail;
	uint32_t head, n, i;

	__atomic_exchange_n(&fp->out_kicked, 0, __ATOMIC_SEQ_CST);
	head = __atomic_load_n(&fp->out_head, __ATOMIC_ACQUIRE);
	n = head - tail < size ? head - tail : size;
	for (i = 0; i < n; i++)
		buf[i] = fp->out[(tail + i) % PYL_FAST_RING_SIZE];
	__atomic_store_n(&fp->out_tail, tail + n, __ATOMIC_RELEASE);
	return n;
}
