"""The reaper: what `process.spawn` runs in place of a child, so that no process of the child's tree
outlives servematrix, even a servematrix killed by SIGKILL (which runs no cleanup of its own).

    python -I -S reaper.py OWNER_PID ARGV...

It forks ARGV as its only child and becomes the tree's *subreaper* (PR_SET_CHILD_SUBREAPER): every
descendant whose parent dies is re-parented to it rather than to PID 1, so it can always find the
whole tree (vLLM's EngineCore outlives an api_server killed with SIGKILL; a worker may call setsid).
It then waits for one of two things:
- its child ends: the leftovers of the tree are killed, and it exits as the child did (same code,
  or killed by the same signal), so the caller's exit code and failure classification see the child;
- OWNER_PID is no longer its parent (servematrix died, however): the whole tree is killed.
Ownership is checked by polling getppid() (at most every POLL s), not PR_SET_PDEATHSIG, which
fires when the *thread* that spawned the child ends, not the process. SIGTERM/SIGINT are ignored
here: the child's group gets them from `process.stop`, and the reaper goes when the child goes.

Standalone (standard library only, no servematrix import) so that it starts in milliseconds under
any interpreter. Linux only (prctl, /proc)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
POLL = 0.2  # s between checks that the owner is alive (a child's exit wakes the reaper at once)
KILL_WAIT = 5.0  # s to reap a killed tree before giving up on a process stuck in the kernel
WAKE = {signal.SIGCHLD}


def descendants(root: int) -> list[int]:
    """Pids of every process under `root` (from /proc), and of its process group."""
    parent, group = {}, []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid, ppid, pgrp = int(name), int(fields[1]), int(fields[2])
        parent[pid] = ppid
        if pgrp == root and pid != root:
            group.append(pid)
    found, frontier = set(group), [root]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and child not in found:
                found.add(child)
                frontier.append(child)
    found.discard(root)
    return sorted(found)


def kill_all(me: int) -> None:
    """SIGKILL every descendant (repeatedly: one may fork meanwhile) and reap them until none is
    left (as subreaper, every one of them ends up our child)."""
    deadline = time.monotonic() + KILL_WAIT
    while time.monotonic() < deadline:
        for pid in descendants(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return  # nothing left
        time.sleep(0.01)


def exit_as(status: int) -> None:
    """Exit the way a child with this wait status did: its code, or killed by its signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no disposition to set
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal that does not kill (SIGCHLD...): say it like a shell
    os._exit(os.waitstatus_to_exitcode(status))


def start(argv: list[str]) -> int:
    pid = os.fork()
    if pid:
        return pid
    # the child: undo what the reaper changed (dispositions and the mask survive exec)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, f"servematrix reaper: cannot run {argv[0]}: {exc}\n".encode())
    os._exit(127)


def main(args: list[str]) -> None:
    owner, argv = int(args[0]), args[1:]
    me = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.write(2, b"servematrix reaper: prctl(PR_SET_CHILD_SUBREAPER) failed\n")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, WAKE)  # delivered through sigtimedwait only
    if os.getppid() != owner:  # the owner died before we got here
        os._exit(1)
    child = start(argv)
    while True:
        signal.sigtimedwait(WAKE, POLL)
        while True:  # reap what ended: the child, or orphans re-parented to us
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if not pid:
                break
            if pid == child:
                kill_all(me)
                exit_as(status)
        if os.getppid() != owner:
            kill_all(me)
            os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
