"""The host files a launcher opens: its own standard fds, and its user's files.

Everything here is the user's input, and a launcher that trusts it can be
made to hang, crash or destroy data.  So:

* `ensure_standard_fds()` runs before anything else is opened.  A process
  started with fd 0, 1 or 2 closed (`<&- >&-`, as some daemons and CI
  runners start their children) hands the next file it opens the lowest
  free number: the first disk image would become fd 1, and the guest's
  console output would be written into it.  Each closed standard fd is
  pointed at /dev/null instead, as a daemon does.

* `open_user_file()` opens with O_NONBLOCK, so that a FIFO named as a
  kernel or a disk cannot block in open() (a FIFO with no writer waits
  forever there), then fstat()s the fd it got, not the path, and accepts
  only the kinds of file the caller names: a directory is not an 8-sector
  disk, and /dev/zero is not a kernel.  Then O_NONBLOCK goes again.

* `read_user_file()` reads a kernel or initrd whole, after checking its
  size against a limit (the guest's RAM): a 64 GiB sparse file is an error
  of one line, not a MemoryError.

* `disk_size()` asks the fd itself (lseek to the end), so that a host block
  device, whose st_size is 0, shows its real size.

Every problem is a UsageError naming the file, worded from the errno
(`oserror_text`: an OSError without strerror still says something).
"""

import errno
import fcntl
import os
import stat

from pylguest.errors import UsageError

STANDARD_FDS = (0, 1, 2)

REGULAR = "regular file"
BLOCK_DEVICE = "block device"

_KINDS = ((stat.S_ISREG, REGULAR), (stat.S_ISBLK, BLOCK_DEVICE), (stat.S_ISDIR, "directory"),
          (stat.S_ISCHR, "character device"), (stat.S_ISFIFO, "FIFO"),
          (stat.S_ISSOCK, "socket"))


def ensure_standard_fds() -> None:
    """Point every closed fd among 0, 1 and 2 at /dev/null."""
    for fd in STANDARD_FDS:
        try:
            os.fstat(fd)
        except OSError:
            # open() returns the lowest free number: this very fd.
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)


def oserror_text(error: OSError) -> str:
    """A few words for an OSError, never None: strerror, lower-cased."""
    text = error.strerror or str(error) or errno.errorcode.get(error.errno, "error")
    return text[:1].lower() + text[1:]


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def open_user_file(path, what, flags=os.O_RDONLY, kinds=(REGULAR,)):
    """Open the user's file `path` (`what` names it in messages: "kernel",
    "--block"); return the fd.  Never blocks, and refuses other kinds."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"{what} {path}: {oserror_text(e)}") from None
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind not in kinds:
            wanted = " or ".join(f"a {k}" for k in kinds)
            raise UsageError(f"{what} {path}: is a {kind}, not {wanted}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_user_file(path, what, limit):
    """The whole of regular file `path`, refused if it exceeds `limit` bytes."""
    fd = open_user_file(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UsageError(f"{what} {path}: {size} bytes is more than the guest's "
                             f"{limit} bytes of RAM could hold")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:                    # it grew while we read it
            raise UsageError(f"{what} {path}: grew past {limit} bytes while being read")
        return b"".join(chunks)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {oserror_text(e)}") from None
    finally:
        os.close(fd)


def disk_size(fd: int) -> int:
    """The size in bytes of an open image: a file or a host block device."""
    return os.lseek(fd, 0, os.SEEK_END)
