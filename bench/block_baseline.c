/*
 * The floor for bench/block_throughput.py: the same requests as the ring
 * side, issued by a C loop with preadv/pwritev and one page-aligned buffer,
 * so the figure is the system calls' own cost, not Python's.
 *
 *	block_baseline PATH read|write REQUEST_BYTES OFFSETS_FILE direct|cached
 *
 * OFFSETS_FILE holds the requests' byte offsets as little-endian u64s, in
 * order.  Prints "SECONDS BYTES" (only the loop is timed).
 */
#define _GNU_SOURCE		/* O_DIRECT */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>

static uint64_t *read_offsets(const char *path, size_t *count)
{
	struct stat st;
	uint64_t *offsets;
	int fd = open(path, O_RDONLY);

	if (fd < 0 || fstat(fd, &st) < 0)
		return NULL;
	*count = st.st_size / sizeof(uint64_t);
	offsets = malloc(st.st_size ? st.st_size : 1);
	if (offsets && read(fd, offsets, st.st_size) != st.st_size) {
		free(offsets);
		offsets = NULL;
	}
	close(fd);
	return offsets;
}

int main(int argc, char **argv)
{
	struct timespec start, end;
	struct iovec iov;
	uint8_t *buffers;
	uint64_t *offsets, moved = 0;
	size_t count, i, request, nbuf;
	int fd, write, direct;
	ssize_t n;

	if (argc != 7) {
		fprintf(stderr, "usage: %s PATH read|write BYTES OFFSETS direct|cached NBUF\n",
			argv[0]);
		return 2;
	}
	write = strcmp(argv[2], "write") == 0;
	request = strtoul(argv[3], NULL, 0);
	direct = strcmp(argv[5], "direct") == 0;
	nbuf = strtoul(argv[6], NULL, 0);
	offsets = read_offsets(argv[4], &count);
	fd = open(argv[1], O_RDWR | (direct ? O_DIRECT : 0));
	if (!offsets || fd < 0 || !request || !nbuf) {
		perror("block_baseline");
		return 1;
	}
	iov.iov_len = request;
	buffers = mmap(NULL, request * nbuf, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buffers == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (i = 0; i < request * nbuf; i++)	/* bench/block_throughput.py's pattern */
		buffers[i] = (uint8_t)((i % request) * 7 + 3);
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (i = 0; i < count; i++) {
		iov.iov_base = buffers + (i % nbuf) * request;
		n = write ? pwritev(fd, &iov, 1, offsets[i]) : preadv(fd, &iov, 1, offsets[i]);
		if (n != (ssize_t)request) {
			perror("block_baseline: short or failed request");
			return 1;
		}
		moved += n;
	}
	clock_gettime(CLOCK_MONOTONIC, &end);
	printf("%.9f %llu\n", (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9,
	       (unsigned long long)moved);
	return 0;
}
