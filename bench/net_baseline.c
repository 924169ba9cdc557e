/*
 * The floor for bench/net_throughput.py's tap rows: the same frames
 * written to (transmit) or read from (receive) the same tap by a C loop,
 * so the figure is the system calls' own cost, not Python's.  Built by
 * the benchmark into bench/build/net_baseline.so and called through
 * ctypes, once per run (transmit) or once per batch (receive).
 */
#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

/* Seconds to write `frame` (virtio_net_hdr and frame) `count` times; -1 on error. */
double net_baseline_transmit(int fd, const uint8_t *frame, size_t len, uint64_t count)
{
	struct timespec start, end;
	uint64_t i;

	clock_gettime(CLOCK_MONOTONIC, &start);
	for (i = 0; i < count; i++)
		if (write(fd, frame, len) != (ssize_t)len)
			return -1;
	clock_gettime(CLOCK_MONOTONIC, &end);
	return (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
}

/* Frames read into `buf` until the (non-blocking) tap is empty; -1 on error. */
long net_baseline_receive(int fd, uint8_t *buf, size_t room)
{
	long frames = 0;

	for (;;) {
		if (read(fd, buf, room) < 0)
			return errno == EAGAIN ? frames : -1;
		frames++;
	}
}
