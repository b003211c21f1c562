"""Runs a command with some system calls failing with EPERM, as systemd's SystemCallFilter= does for the calls it
denies under SystemCallErrorNumber=EPERM. Needs Debian's python3-seccomp (libseccomp), so it runs under
/usr/bin/python3; the filter stays on across exec.
usage: /usr/bin/python3 tests/seccomp_exec.py SYSCALL[,SYSCALL…] COMMAND [ARGUMENT…]
"""
import errno
import os
import sys

import seccomp


def main():
    denied, command = sys.argv[1].split(","), sys.argv[2:]
    syscall_filter = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in denied:
        syscall_filter.add_rule(seccomp.ERRNO(errno.EPERM), name)
    syscall_filter.load()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
