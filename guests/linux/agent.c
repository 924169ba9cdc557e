// SPDX-License-Identifier: GPL-2.0
/*
 * pylguest-agent: the guest's end of the agent channel.
 *
 *	pylguest-agent PORT	serve the channel on a virtio console port
 *				(/dev/vport0p0, say; a tty would be put in
 *				raw mode); the initramfs's /init starts it
 *	pylguest-agent --fd N	serve it on an open file descriptor (the
 *				tests run it on the host, over a socket pair)
 *	pylguest-agent --root DIR PORT
 *				open the port, then chroot to DIR: with
 *				`pylguest run --root`, commands run in the
 *				root the user chose, not in the initramfs
 *
 * The protocol is docs/abi.md, section 8.  Everything on the channel is a
 * frame: a 12-byte header and up to 64 KiB of payload.  The host opens
 * requests -- EXEC a command, PUT a file, GET a file, set the CLOCK --
 * and the agent answers each until EXIT, DONE, an empty DATA or ERROR ends
 * it.  Any number of requests (up to 64) run side by side.
 *
 * Everything happens in one poll() loop, over
 *   - the channel, read a piece at a time (a frame may come in pieces);
 *   - a self-pipe, which the SIGCHLD handler writes a byte to;
 *   - each command's stdout and stderr pipes, and its stdin pipe while
 *     there is something to write to it;
 * with a timeout that is the nearest command's deadline (or none at all
 * while a GET streams: then each turn of the loop sends one chunk).
 *
 * Our ends of the pipes never block, and reading the channel does not
 * either once poll() said it is readable.  Writing the channel may block:
 * the host always reads, and a frame is only ever written whole.
 *
 * Build: gcc -static -O2 -Wall -Wextra -Werror -o pylguest-agent agent.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define NAME		"pylguest-agent"
#define VERSION		2		/* 2: CLOCK */
#define MAX_PAYLOAD	65536
#define WINDOW		262144		/* STDIN or DATA bytes unACKed, per request */
#define MAX_REQUESTS	64
#define DEFAULT_PATH	"/sbin:/bin:/usr/sbin:/usr/bin"

enum frame_type {
	/* host to agent */
	FRAME_EXEC = 0x01, FRAME_STDIN = 0x02, FRAME_SIGNAL = 0x03,
	FRAME_PUT = 0x04, FRAME_GET = 0x05, FRAME_DATA = 0x06,
	FRAME_CLOCK = 0x07,
	/* agent to host (and DATA) */
	FRAME_HELLO = 0x81, FRAME_STDOUT = 0x82, FRAME_STDERR = 0x83,
	FRAME_EXIT = 0x84, FRAME_ACK = 0x85, FRAME_STAT = 0x87,
	FRAME_DONE = 0x88, FRAME_ERROR = 0x89,
};

/*
 * The channel's integers are little-endian, like x86's, so its headers and
 * fixed payloads are plain structs here, field for field as abi.md has them.
 */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the channel is little-endian");

struct header {
	uint32_t length;		/* payload bytes, 0 to MAX_PAYLOAD */
	uint32_t id;			/* the request; 0 for the channel itself */
	uint16_t type;
	uint16_t reserved;		/* 0 */
};

struct frame {
	struct header h;
	unsigned char payload[MAX_PAYLOAD];
};

struct __attribute__((packed)) hello {
	uint32_t version, max_payload, window;
	char name[sizeof(NAME) - 1];	/* the rest of the payload: no NUL */
};

enum how { EXITED = 0, SIGNALLED = 1, TIMED_OUT = 2 };

struct exit_payload {
	uint32_t how;
	int32_t value;			/* the exit status, or the signal */
};

struct __attribute__((packed)) stat_payload {
	uint32_t mode;			/* permission bits */
	uint64_t size;
};

#define EXEC_STDIN	1		/* EXEC flag: stdin comes in STDIN frames */

enum kind { FREE = 0, EXEC, PUT, GET };

struct request {
	enum kind kind;			/* FREE: the slot is unused */
	uint32_t id;
	/* EXEC */
	pid_t pid;			/* the command, leader of its process group */
	int out, err;			/* our ends of its stdout, stderr pipes; or -1 */
	int in;				/* our end of its stdin pipe; or -1 */
	bool takes_stdin;		/* STDIN frames feed it */
	bool stdin_ended;		/* the host sent the empty STDIN */
	bool stdin_gone;		/* the command closed its end of the pipe */
	unsigned char *pending;		/* stdin not yet written: [head, tail) */
	size_t head, tail;
	int64_t deadline;		/* ms, CLOCK_MONOTONIC; 0: no timeout */
	bool timed_out;
	/* PUT, GET */
	int file;
};

static struct request requests[MAX_REQUESTS];
static int channel = -1;
static int sigchld_pipe[2];

static struct frame in_frame;		/* the frame coming in ... */
static size_t in_have;			/* ... and how many bytes of it are here */
static struct frame out_frame;
static unsigned char chunk[MAX_PAYLOAD];	/* a pipe's or a file's bytes */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* -- requests ------------------------------------------------------------ */

static struct request *find_request(uint32_t id)
{
	for (int i = 0; i < MAX_REQUESTS; i++)
		if (requests[i].kind != FREE && requests[i].id == id)
			return &requests[i];
	return NULL;
}

static struct request *find_command(pid_t pid)
{
	for (int i = 0; i < MAX_REQUESTS; i++)
		if (requests[i].kind == EXEC && requests[i].pid == pid)
			return &requests[i];
	return NULL;
}

static struct request *new_request(uint32_t id, enum kind kind)
{
	for (int i = 0; i < MAX_REQUESTS; i++) {
		struct request *r = &requests[i];

		if (r->kind == FREE) {
			*r = (struct request){ .kind = kind, .id = id,
					       .out = -1, .err = -1, .in = -1, .file = -1 };
			return r;
		}
	}
	return NULL;
}

/*
 * Signal the command's process group.  Between fork() and its setsid()
 * the child leads no group yet, and has no children either: then the
 * signal goes to it alone.
 */
static void signal_command(struct request *r, int sig)
{
	if (r->pid <= 0)		/* never started: kill(0) would hit us */
		return;
	if (kill(-r->pid, sig) < 0 && errno == ESRCH)
		kill(r->pid, sig);
}

/*
 * The request is over: free its slot.  A command still running loses its
 * pipes; the SIGCHLD loop reaps it later and, finding no request for its
 * pid, says nothing.
 */
static void release(struct request *r)
{
	close_fd(&r->out);
	close_fd(&r->err);
	close_fd(&r->in);
	close_fd(&r->file);
	free(r->pending);
	r->pending = NULL;
	r->kind = FREE;
}

/* Leave for good, killing our commands: nobody else would reap them. */
static void __attribute__((noreturn, format(printf, 2, 3)))
quit(int status, const char *fmt, ...)
{
	va_list args;

	for (int i = 0; i < MAX_REQUESTS; i++)
		if (requests[i].kind == EXEC)
			signal_command(&requests[i], SIGKILL);
	fprintf(stderr, NAME ": ");
	va_start(args, fmt);
	vfprintf(stderr, fmt, args);
	va_end(args);
	fputc('\n', stderr);
	exit(status);
}

/* -- sending frames ------------------------------------------------------ */

static void send_frame(uint32_t id, enum frame_type type, const void *payload, size_t length)
{
	const char *p = (const char *)&out_frame;
	size_t left = sizeof(out_frame.h) + length;

	out_frame.h = (struct header){ .length = length, .id = id, .type = type };
	if (length)
		memcpy(out_frame.payload, payload, length);
	while (left > 0) {
		ssize_t n = write(channel, p, left);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			quit(1, "writing the channel: %s", n ? strerror(errno) : "wrote nothing");
		p += n;
		left -= n;
	}
}

static void send_ack(struct request *r, uint32_t bytes)
{
	send_frame(r->id, FRAME_ACK, &bytes, sizeof(bytes));
}

static void send_error(uint32_t id, int err, const char *message)
{
	struct {
		int32_t errno_value;
		char message[256];
	} error = { err, "" };
	size_t n = strnlen(message, sizeof(error.message));

	memcpy(error.message, message, n);
	send_frame(id, FRAME_ERROR, &error, sizeof(error.errno_value) + n);
}

/*
 * A request the agent cannot go on with: ERROR ends it, and a command it
 * runs is killed (nobody will read its output or its status any more).
 */
static void __attribute__((format(printf, 3, 4)))
fail(struct request *r, int err, const char *fmt, ...)
{
	char why[256];
	va_list args;

	va_start(args, fmt);
	vsnprintf(why, sizeof(why), fmt, args);
	va_end(args);
	send_error(r->id, err, why);
	signal_command(r, SIGKILL);
	release(r);
}

/* -- reading a request's payload ----------------------------------------- */

struct reader {
	const unsigned char *p;
	size_t left;
	bool bad;			/* it ran out, or held what it may not */
};

static uint32_t take_u32(struct reader *in)
{
	uint32_t v = 0;

	if (in->left < 4)
		in->bad = true;
	if (in->bad)
		return 0;
	memcpy(&v, in->p, 4);
	in->p += 4;
	in->left -= 4;
	return v;
}

/*
 * A string (u32 count, then bytes), copied to *space with a NUL after it.
 * A NUL inside could not reach exec() or open(): a bad request.  A string
 * takes 4 + n bytes of payload and n + 1 of space, so space as large as
 * the payload always suffices.
 */
static char *take_string(struct reader *in, char **space)
{
	uint32_t n = take_u32(in);
	char *s = *space;

	if (n > in->left || memchr(in->p, 0, n))
		in->bad = true;
	if (in->bad)
		return NULL;
	memcpy(s, in->p, n);
	s[n] = 0;
	*space += n + 1;
	in->p += n;
	in->left -= n;
	return s;
}

/* A u32 count, then that many strings: a NULL-terminated array. */
static char **take_strings(struct reader *in, char **space)
{
	uint32_t count = take_u32(in);
	char **list = NULL;

	if (count <= in->left / 4 && !in->bad)
		list = calloc(count + 1, sizeof(*list));
	if (!list)
		in->bad = true;
	for (uint32_t i = 0; i < count && !in->bad; i++)
		list[i] = take_string(in, space);
	return list;
}

/* The rest of the payload, as a path (a static copy, NUL-terminated). */
static char *take_path(struct reader *in)
{
	static char path[MAX_PAYLOAD + 1];

	if (in->left == 0 || memchr(in->p, 0, in->left))
		in->bad = true;
	if (in->bad)
		return NULL;
	memcpy(path, in->p, in->left);
	path[in->left] = 0;
	in->left = 0;
	return path;
}

/* -- EXEC: starting a command -------------------------------------------- */

struct command {
	uint32_t timeout_ms, flags;
	char **argv, **env, *cwd;
	char *space;			/* the strings argv, env and cwd point into */
};

static bool parse_exec(const unsigned char *payload, size_t length, struct command *c)
{
	struct reader in = { payload, length, false };
	char *next = c->space = malloc(length);

	if (!next)
		return false;
	c->timeout_ms = take_u32(&in);
	c->flags = take_u32(&in);
	c->argv = take_strings(&in, &next);
	c->env = take_strings(&in, &next);
	c->cwd = take_string(&in, &next);
	if (in.bad || in.left || !c->argv[0] || c->flags & ~EXEC_STDIN)
		return false;
	for (char **e = c->env; *e; e++)
		if (!strchr(*e, '='))
			return false;
	return true;
}

/*
 * In the child: a session of its own (so the command leads its own process
 * group and has no controlling terminal), the pipes as fds 0-2, the
 * directory, the environment, and exec.  What cannot be run is reported
 * as a shell would: a line on stderr, status 127 (not found) or 126.
 */
static void __attribute__((noreturn))
run_child(struct command *c, int in, int out, int err)
{
	const char *cwd = c->cwd[0] ? c->cwd : "/";
	sigset_t none;
	int status;

	setsid();
	for (int sig = 1; sig < NSIG; sig++)	/* see spawn() */
		signal(sig, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	if (in < 0)
		in = open("/dev/null", O_RDONLY);
	if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
		_exit(127);
	if (chdir(cwd) < 0) {
		dprintf(2, NAME ": cannot change directory to %s: %s\n", cwd, strerror(errno));
		_exit(127);
	}
	for (char **e = c->env; *e; e++)
		putenv(*e);
	execvp(c->argv[0], c->argv);
	status = errno == ENOENT ? 127 : 126;
	dprintf(2, NAME ": %s: %s\n", c->argv[0], strerror(errno));
	_exit(status);
}

/*
 * fork() with every signal blocked until the child has set them all to
 * their defaults.  An ignored signal stays ignored across exec (/init's
 * "&" starts us with SIGINT and SIGQUIT ignored), and the host's SIGNAL
 * may come before the child is ready: blocked, it waits; ignored, it
 * would be lost.
 */
static pid_t spawn(struct command *c, int in, int out, int err)
{
	sigset_t all, old;
	pid_t pid;

	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, &old);
	pid = fork();
	if (pid == 0)
		run_child(c, in, out, err);
	sigprocmask(SIG_SETMASK, &old, NULL);
	return pid;
}

/* A pipe whose end `ours` (0: read, 1: write) does not block. */
static int make_pipe(int fds[2], int ours)
{
	if (pipe2(fds, O_CLOEXEC) < 0)
		return -1;
	return fcntl(fds[ours], F_SETFL, O_NONBLOCK);
}

static void start_exec(struct request *r, const unsigned char *payload, size_t length)
{
	struct command c = { 0 };
	int in[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 };
	const char *why = "cannot start the command";
	int error = 0;

	if (!parse_exec(payload, length, &c)) {
		error = EINVAL;
		why = "malformed EXEC";
	} else if (c.flags & EXEC_STDIN &&
		   (!(r->pending = malloc(WINDOW)) || make_pipe(in, 1) < 0)) {
		error = errno;
	} else if (make_pipe(out, 0) < 0 || make_pipe(err, 0) < 0) {
		error = errno;
	} else if ((r->pid = spawn(&c, in[0], out[1], err[1])) < 0) {
		error = errno;
	}

	/* The child's ends are the child's: ours would keep its pipes open. */
	close_fd(&in[0]);
	close_fd(&out[1]);
	close_fd(&err[1]);
	free(c.argv);
	free(c.env);
	free(c.space);
	r->takes_stdin = c.flags & EXEC_STDIN;
	r->in = in[1];
	r->out = out[0];
	r->err = err[0];
	if (error)
		fail(r, error, "%s", why);
	else if (c.timeout_ms)
		r->deadline = now_ms() + c.timeout_ms;
}

/* -- EXEC: the running command ------------------------------------------- */

/* Send what the pipe holds now (one read), or close it at its end. */
static void forward_output(struct request *r, int *fd, enum frame_type type)
{
	ssize_t n = read(*fd, chunk, sizeof(chunk));

	if (n > 0)
		send_frame(r->id, type, chunk, n);
	else if (n == 0 || (errno != EAGAIN && errno != EINTR))
		close_fd(fd);
}

/*
 * The command has exited: send what it left in the pipe, and close it.
 * Only the bytes there now (FIONREAD), so that a background process that
 * goes on writing cannot keep us here.
 */
static void forward_rest(struct request *r, int *fd, enum frame_type type)
{
	int left = 0;

	if (*fd >= 0)
		ioctl(*fd, FIONREAD, &left);
	while (left > 0) {
		ssize_t n = read(*fd, chunk, left < MAX_PAYLOAD ? left : MAX_PAYLOAD);

		if (n <= 0)
			break;
		send_frame(r->id, type, chunk, n);
		left -= n;
	}
	close_fd(fd);
}

static void finish_exec(struct request *r, int status)
{
	struct exit_payload exit = { EXITED, WEXITSTATUS(status) };

	if (r->timed_out)
		exit = (struct exit_payload){ TIMED_OUT, SIGKILL };
	else if (WIFSIGNALED(status))
		exit = (struct exit_payload){ SIGNALLED, WTERMSIG(status) };
	forward_rest(r, &r->out, FRAME_STDOUT);
	forward_rest(r, &r->err, FRAME_STDERR);
	send_frame(r->id, FRAME_EXIT, &exit, sizeof(exit));
	release(r);
}

static void reap_children(void)
{
	char drain[64];
	pid_t pid;
	int status;

	while (read(sigchld_pipe[0], drain, sizeof(drain)) > 0)
		;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		struct request *r = find_command(pid);

		if (r)
			finish_exec(r, status);
	}
}

static void check_deadlines(void)
{
	int64_t now = now_ms();

	for (int i = 0; i < MAX_REQUESTS; i++) {
		struct request *r = &requests[i];

		if (r->kind == EXEC && r->deadline && !r->timed_out && now >= r->deadline) {
			r->timed_out = true;
			signal_command(r, SIGKILL);
		}
	}
}

static void end_stdin_if_done(struct request *r)
{
	if (r->stdin_ended && r->head == r->tail)
		close_fd(&r->in);
}

/*
 * Bytes written to the pipe are consumed: ACK them.  If the command has
 * closed its stdin, what is pending is thrown away and ACKed too, so the
 * host is never left waiting for a window that cannot open.
 */
static void feed_stdin(struct request *r)
{
	ssize_t n = write(r->in, r->pending + r->head, r->tail - r->head);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n < 0) {
		r->stdin_gone = true;
		n = r->tail - r->head;
		close_fd(&r->in);
	}
	r->head += n;
	if (r->head == r->tail)
		r->head = r->tail = 0;
	send_ack(r, n);
	end_stdin_if_done(r);
}

/* Keep n more bytes of stdin, moving what is pending to the front if need be. */
static void queue_stdin(struct request *r, const unsigned char *data, size_t n)
{
	if (r->tail + n > WINDOW) {
		memmove(r->pending, r->pending + r->head, r->tail - r->head);
		r->tail -= r->head;
		r->head = 0;
	}
	memcpy(r->pending + r->tail, data, n);
	r->tail += n;
}

static void take_stdin(struct request *r, const unsigned char *data, size_t n)
{
	if (r->kind != EXEC || !r->takes_stdin || r->stdin_ended) {
		fail(r, EINVAL, "STDIN for a request whose stdin is not open");
	} else if (n == 0) {
		r->stdin_ended = true;
		end_stdin_if_done(r);
	} else if (r->stdin_gone) {
		send_ack(r, n);		/* see feed_stdin() */
	} else if (r->tail - r->head + n > WINDOW) {
		fail(r, EPROTO, "STDIN beyond the window");
	} else {
		queue_stdin(r, data, n);
	}
}

static void take_signal(struct request *r, const unsigned char *payload, size_t n)
{
	uint32_t sig = 0;

	if (n == sizeof(sig))
		memcpy(&sig, payload, n);
	if (r->kind != EXEC || sig < 1 || sig >= NSIG)
		fail(r, EINVAL, "SIGNAL that is not a signal number for a command");
	else
		signal_command(r, sig);
}

/* -- PUT and GET: files -------------------------------------------------- */

/*
 * O_NONBLOCK: a FIFO without a reader gives an error, rather than stopping
 * the agent in open(); on a regular file it changes nothing.
 */
static void start_put(struct request *r, const unsigned char *payload, size_t length)
{
	struct reader in = { payload, length, false };
	uint32_t mode = take_u32(&in);
	char *path = take_path(&in);
	int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK;

	if (in.bad || mode & ~07777)
		fail(r, EINVAL, "malformed PUT");
	else if ((r->file = open(path, flags, mode)) < 0 || fchmod(r->file, mode) < 0)
		fail(r, errno, "cannot write %s", path);
}

/* A PUT's bytes go to the file at once, so they are ACKed at once. */
static void write_file(struct request *r, const unsigned char *data, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t w = write(r->file, data + done, n - done);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			fail(r, w < 0 ? errno : EIO, "writing the file failed");
			return;
		}
		done += w;
	}
	send_ack(r, n);
}

/* The empty DATA: the file is whole once it is closed. */
static void finish_put(struct request *r)
{
	int closed = close(r->file);

	r->file = -1;
	if (closed < 0) {
		fail(r, errno, "closing the file failed");
	} else {
		send_frame(r->id, FRAME_DONE, NULL, 0);
		release(r);
	}
}

static void take_data(struct request *r, const unsigned char *data, size_t n)
{
	if (r->kind != PUT)
		fail(r, EINVAL, "DATA for a request that is not a PUT");
	else if (n > 0)
		write_file(r, data, n);
	else
		finish_put(r);
}

static void start_get(struct request *r, const unsigned char *payload, size_t length)
{
	struct reader in = { payload, length, false };
	char *path = take_path(&in);
	struct stat st;

	if (in.bad)
		fail(r, EINVAL, "malformed GET");
	else if ((r->file = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)) < 0 ||
		 fstat(r->file, &st) < 0)
		fail(r, errno, "cannot read %s", path);
	else if (!S_ISREG(st.st_mode))
		fail(r, S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "%s is not a regular file", path);
	else
		send_frame(r->id, FRAME_STAT,
			   &(struct stat_payload){ st.st_mode & 07777, st.st_size },
			   sizeof(struct stat_payload));
}

/* One DATA frame of the file, or the empty one at its end. */
static void stream_file(struct request *r)
{
	ssize_t n = read(r->file, chunk, sizeof(chunk));

	if (n < 0 && errno != EINTR) {
		fail(r, errno, "reading the file failed");
	} else if (n >= 0) {
		send_frame(r->id, FRAME_DATA, chunk, n);
		if (n == 0)
			release(r);
	}
}

/* -- CLOCK: the wall clock ---------------------------------------------- */

struct __attribute__((packed)) clock_payload {
	int64_t seconds;		/* since the epoch, UTC */
	uint32_t nanoseconds;
};

/*
 * A guest restored from a snapshot goes on from the snapshot's instant
 * (kvmclock is restored, not advanced), so its wall clock is as old as the
 * snapshot until the host sets it.  Answered at once, DONE or ERROR: it
 * needs no slot, and costs no fork and exec of date(1).
 */
static void set_clock(uint32_t id, struct request *open,
		      const unsigned char *payload, size_t length)
{
	struct clock_payload c;
	struct timespec when;

	if (open) {
		fail(open, EINVAL, "a request with this id is open already");
		return;
	}
	if (length != sizeof(c)) {
		send_error(id, EINVAL, "malformed CLOCK");
		return;
	}
	memcpy(&c, payload, sizeof(c));
	if (c.seconds < 0 || c.nanoseconds >= 1000000000) {
		send_error(id, EINVAL, "CLOCK out of range");
		return;
	}
	when = (struct timespec){ .tv_sec = c.seconds, .tv_nsec = c.nanoseconds };
	if (clock_settime(CLOCK_REALTIME, &when) < 0)
		send_error(id, errno, "cannot set the clock");
	else
		send_frame(id, FRAME_DONE, NULL, 0);
}

/* -- frames from the host ------------------------------------------------ */

static void open_request(uint32_t id, enum frame_type type, const unsigned char *p, size_t n)
{
	struct request *r = find_request(id);

	if (r) {
		fail(r, EINVAL, "a request with this id is open already");
		return;
	}
	r = new_request(id, type == FRAME_EXEC ? EXEC : type == FRAME_PUT ? PUT : GET);
	if (!r)
		send_error(id, EBUSY, "too many requests are open at once");
	else if (type == FRAME_EXEC)
		start_exec(r, p, n);
	else if (type == FRAME_PUT)
		start_put(r, p, n);
	else
		start_get(r, p, n);
}

/*
 * STDIN, SIGNAL or DATA for an id that is not open is no error: the host
 * may send it before it has read the EXIT or ERROR that closed the request.
 */
static void handle_frame(uint32_t id, enum frame_type type, const unsigned char *p, size_t n)
{
	struct request *r = find_request(id);

	if (type == FRAME_EXEC || type == FRAME_PUT || type == FRAME_GET)
		open_request(id, type, p, n);
	else if (type == FRAME_CLOCK)
		set_clock(id, r, p, n);
	else if (r && type == FRAME_STDIN)
		take_stdin(r, p, n);
	else if (r && type == FRAME_SIGNAL)
		take_signal(r, p, n);
	else if (r)
		take_data(r, p, n);
}

/*
 * A header that breaks the rules leaves us no way to find the next frame:
 * the channel cannot be resynchronised, so the agent ends.
 */
static void check_header(const struct header *h)
{
	if (h->length > MAX_PAYLOAD || h->reserved || !h->id ||
	    h->type < FRAME_EXEC || h->type > FRAME_CLOCK)
		quit(2, "malformed frame from the host: length %u (at most %d), id %u, "
		     "type 0x%x, reserved 0x%x", h->length, MAX_PAYLOAD, h->id, h->type,
		     h->reserved);
}

/* Read on into the frame coming in; handle it once it is whole. */
static void read_channel(void)
{
	size_t header = sizeof(in_frame.h);
	size_t want = header + (in_have >= header ? in_frame.h.length : 0);
	ssize_t n = read(channel, (char *)&in_frame + in_have, want - in_have);

	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (n < 0)
		quit(1, "reading the channel: %s", strerror(errno));
	if (n == 0)
		quit(0, "the host closed the channel");
	in_have += n;
	if (in_have == header)
		check_header(&in_frame.h);
	if (in_have >= header && in_have == header + in_frame.h.length) {
		in_have = 0;
		handle_frame(in_frame.h.id, in_frame.h.type, in_frame.payload, in_frame.h.length);
	}
}

/* -- the loop ------------------------------------------------------------ */

/* Until the nearest deadline; 0 while a GET streams; -1: no timeout. */
static int poll_timeout(void)
{
	int64_t now = now_ms(), wait = -1;

	for (int i = 0; i < MAX_REQUESTS; i++) {
		struct request *r = &requests[i];

		if (r->kind == GET)
			return 0;
		if (r->kind == EXEC && r->deadline && !r->timed_out &&
		    (wait < 0 || r->deadline - now < wait))
			wait = r->deadline > now ? r->deadline - now : 0;
	}
	return wait > INT32_MAX ? INT32_MAX : wait;
}

struct watch {
	struct request *r;
	int *fd;			/* &r->out, &r->err or &r->in */
};

static void serve(void)
{
	struct pollfd fds[2 + 3 * MAX_REQUESTS];
	struct watch watches[2 + 3 * MAX_REQUESTS];

	for (;;) {
		int n = 2;

		fds[0] = (struct pollfd){ .fd = channel, .events = POLLIN };
		fds[1] = (struct pollfd){ .fd = sigchld_pipe[0], .events = POLLIN };
		for (int i = 0; i < MAX_REQUESTS; i++) {
			struct request *r = &requests[i];
			int *streams[] = { &r->out, &r->err, &r->in };

			for (int s = 0; s < 3 && r->kind == EXEC; s++) {
				if (*streams[s] < 0 || (s == 2 && r->head == r->tail))
					continue;
				watches[n] = (struct watch){ r, streams[s] };
				fds[n++] = (struct pollfd){ .fd = *streams[s],
							    .events = s < 2 ? POLLIN : POLLOUT };
			}
		}
		if (poll(fds, n, poll_timeout()) < 0 && errno != EINTR)
			quit(1, "poll: %s", strerror(errno));
		check_deadlines();

		/*
		 * The pipes first: their entries still match their requests,
		 * and a command's last output goes out before its EXIT.  Then
		 * reaping, and the host's frame, which may free slots.
		 */
		for (int i = 2; i < n; i++) {
			struct watch *w = &watches[i];

			if (!fds[i].revents)
				continue;
			if (w->fd == &w->r->in)
				feed_stdin(w->r);
			else
				forward_output(w->r, w->fd, w->fd == &w->r->out ?
					       FRAME_STDOUT : FRAME_STDERR);
		}
		if (fds[1].revents)
			reap_children();
		if (fds[0].revents)
			read_channel();
		for (int i = 0; i < MAX_REQUESTS; i++)
			if (requests[i].kind == GET)
				stream_file(&requests[i]);
	}
}

/* -- setting up ---------------------------------------------------------- */

static void on_sigchld(int sig)
{
	int saved = errno;
	ssize_t n = write(sigchld_pipe[1], "", 1);	/* if full, one is pending */

	(void)sig;
	(void)n;
	errno = saved;
}

/*
 * Nothing a command does may end the agent: a reader that went away
 * (SIGPIPE) or a tty hangup (SIGHUP) is an error return, not a death.
 */
static void set_up_signals(void)
{
	struct sigaction sa = { .sa_handler = on_sigchld, .sa_flags = SA_RESTART };

	if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
		quit(1, "pipe: %s", strerror(errno));
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	sigemptyset(&sa.sa_mask);
	sigaction(SIGCHLD, &sa, NULL);
}

/*
 * The channel: a virtio console port, a character device that passes
 * every byte as it is; a tty, put in raw mode to do the same (no echo, no
 * line editing, no CR/LF translation); or an fd we were given.  Either
 * way it blocks: poll() says when to read, and writes wait for the host.
 * TCSAFLUSH drops input that an agent before us (/init restarts a dead
 * one) left half-read: the host speaks to us only after our HELLO.
 */
static int open_channel(int argc, char **argv)
{
	struct termios tio;
	char *end;
	int fd;

	if (argc == 3 && strcmp(argv[1], "--fd") == 0) {
		long n = strtol(argv[2], &end, 10);

		fd = *end || n < 0 || n > INT32_MAX ? -1 : n;
		if (fd < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
			quit(2, "--fd %s: not an open file descriptor", argv[2]);
	} else if (argc == 2 && argv[1][0] != '-') {
		fd = open(argv[1], O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (fd < 0)
			quit(1, "%s: %s", argv[1], strerror(errno));
		if (isatty(fd) && tcgetattr(fd, &tio) == 0) {
			cfmakeraw(&tio);
			if (tcsetattr(fd, TCSAFLUSH, &tio) < 0)
				quit(1, "%s: raw mode: %s", argv[1], strerror(errno));
		}
	} else {
		quit(2, "usage: " NAME " [--root DIR] PORT | " NAME " --fd N");
	}
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
	return fd;
}

int main(int argc, char **argv)
{
	struct hello hello = { VERSION, MAX_PAYLOAD, WINDOW, "" };
	const char *root = NULL;

	/*
	 * fds 0-2 open (on /dev/null if need be), so that no pipe of ours
	 * gets one of them and then collides with a child's dup2().
	 */
	while (fcntl(0, F_GETFD) < 0 || fcntl(1, F_GETFD) < 0 || fcntl(2, F_GETFD) < 0)
		if (open("/dev/null", O_RDWR) < 0)
			return 1;
	/* Our own process group: no command's group signal reaches us. */
	setsid();
	/*
	 * What a command leaves behind becomes our child when its parent
	 * dies, and the SIGCHLD loop reaps it: in the guest, process 1 is a
	 * shell busy waiting for its own command.
	 */
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	set_up_signals();
	setenv("PATH", DEFAULT_PATH, 0);
	if (argc >= 3 && strcmp(argv[1], "--root") == 0) {
		root = argv[2];
		argv[2] = argv[0];
		argc -= 2;
		argv += 2;
	}
	channel = open_channel(argc, argv);
	/* The port is open: from here on the commands' root is the user's. */
	if (root && (chroot(root) < 0 || chdir("/") < 0))
		quit(1, "--root %s: %s", root, strerror(errno));
	memcpy(hello.name, NAME, sizeof(hello.name));
	send_frame(0, FRAME_HELLO, &hello, sizeof(hello));
	serve();
}
