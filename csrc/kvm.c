/*
 * kvm.c: the launcher's C beside KVM -- an ioctl with its argument's C
 * type, and the signal handlers that stop (or wake) a vCPU in KVM_RUN
 * without a race.  Python reaches these through pylguest.h.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>

#include "pylguest.h"

int pyl_ioctl(int fd, unsigned long request, void *arg)
{
	return ioctl(fd, request, arg);
}

int pyl_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
	return ioctl(fd, request, arg);
}

int pyl_run(int vcpu_fd)
{
	return ioctl(vcpu_fd, KVM_RUN, 0);
}

/*
 * Stopping a running vCPU without a race.
 *
 * A signal that arrives while the vCPU thread is inside KVM_RUN makes the
 * ioctl return EINTR.  But one that arrives just *before* the thread enters
 * KVM_RUN would be noticed only at the guest's next exit, which may be
 * never (a guest in `hlt` with interrupts off).  KVM_CAP_IMMEDIATE_EXIT
 * closes that window: the handler sets kvm_run->immediate_exit, and KVM_RUN
 * returns EINTR at once instead of entering the guest.
 *
 * Python's own signal handlers run later, between bytecodes of the main
 * thread, which is too late for this; so the handler is C.  If the signal
 * was delivered to another thread (a device backend), it is forwarded to
 * the vCPU thread so that thread's KVM_RUN is interrupted.
 */
static struct kvm_run *stop_run;
static pthread_t stop_thread;
/* Written in a signal handler: C's one type for that (C11 7.14.1.1). */
static volatile sig_atomic_t stop_signo;
static int stop_signals[8];
static int stop_count;
static struct sigaction stop_saved[8];

static void stop_handler(int signo)
{
	int saved = errno;

	if (!stop_signo)
		stop_signo = signo;
	if (stop_run)
		stop_run->immediate_exit = 1;
	if (!pthread_equal(pthread_self(), stop_thread))
		pthread_kill(stop_thread, signo);
	errno = saved;
}

/*
 * A wake is not a stop: a pause (a snapshot, run/stop.py's StopRequest.pause)
 * needs the vCPU out of KVM_RUN for a moment and then back in.  So it
 * comes on a signal of its own, whose handler only sets immediate_exit
 * and records nothing.
 */
#define WAKE_SIGNAL SIGUSR2
static struct sigaction wake_saved;

static void wake_handler(int signo)
{
	(void)signo;
	if (stop_run)
		stop_run->immediate_exit = 1;
}

int pyl_arm_stop_signals(struct kvm_run *run, int *signals, int count)
{
	struct sigaction sa;
	int i;

	if (count > 8)
		return -EINVAL;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = wake_handler;
	sigemptyset(&sa.sa_mask);
	if (sigaction(WAKE_SIGNAL, &sa, &wake_saved) < 0)
		return -errno;
	sa.sa_handler = stop_handler;
	stop_run = run;
	stop_thread = pthread_self();
	stop_signo = 0;
	for (i = 0; i < count; i++) {
		if (sigaction(signals[i], &sa, &stop_saved[i]) < 0)
			return -errno;
		stop_signals[i] = signals[i];
		stop_count = i + 1;
	}
	return 0;
}

void pyl_disarm_stop_signals(void)
{
	int i;

	for (i = 0; i < stop_count; i++)
		sigaction(stop_signals[i], &stop_saved[i], NULL);
	if (stop_count)
		sigaction(WAKE_SIGNAL, &wake_saved, NULL);
	stop_count = 0;
	stop_run = NULL;
}

int pyl_stop_signal(void)
{
	return stop_signo;
}

/*
 * Ask the vCPU to stop as if signal `signo` had arrived (timeouts, Ctrl-A x,
 * the Python API): callable from any thread.
 */
void pyl_request_stop(int signo)
{
	if (!stop_signo)
		stop_signo = signo;
	if (stop_run)
		stop_run->immediate_exit = 1;
	if (stop_count && !pthread_equal(pthread_self(), stop_thread))
		pthread_kill(stop_thread, stop_signals[0]);
}

/*
 * Bring the vCPU thread out of KVM_RUN (EINTR) without asking for a stop:
 * the run loop then does what was asked of it (a pause) and runs on.
 */
void pyl_wake_vcpu(void)
{
	if (stop_run)
		stop_run->immediate_exit = 1;
	if (stop_count && !pthread_equal(pthread_self(), stop_thread))
		pthread_kill(stop_thread, WAKE_SIGNAL);
}
