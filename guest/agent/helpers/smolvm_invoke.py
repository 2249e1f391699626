"""smolvm_invoke: let a warm Python program receive each run of its machine.

A smolvm machine built with ``[run] warm = "invoke"`` starts its entrypoint at build time
and snapshots it while it waits here; every run of the machine then resumes it right
at this call, already started up (imports done, data loaded). The protocol is in
docs/WARM.md of smolvm; this module implements it with the standard library only.

    import smolvm_invoke
    import yaml            # slow start-up before the call...
    smolvm_invoke.wait()   # ...the run takes over here: sys.argv, stdio, cwd, environment
    smolvm_invoke.run(main)  # main(), then its status reported: the run ends at once

Outside a warm build (an ordinary start, ``SMOLVM_INVOKE_SOCKET`` unset) ``wait()``
returns ``None`` at once and changes nothing, and ``run``/``exit`` behave as
``sys.exit``, so the same program runs cold as well.
"""

import atexit
import os
import random
import socket
import struct
import sys

__all__ = [
    "Invocation", "wait", "run", "exit", "receive", "decode", "SOCKET_ENV", "DEFAULT_SOCKET",
]

SOCKET_ENV = "SMOLVM_INVOKE_SOCKET"
DEFAULT_SOCKET = "/run/smolvm/invoke.sock"
REQUEST = b"smolvm-invoke 1\n"
MAX_INVOCATION = 1 << 20

# The invocation connection of the run in progress, kept by wait() for exit()'s report.
_conn = None


class Invocation:
    """One run: its whole argv (argv[0] is the program), environment, directory."""

    def __init__(self, argv, env, cwd, reseed):
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.reseed = reseed

    def __repr__(self):
        return "Invocation(argv=%r, cwd=%r, reseed=%r)" % (self.argv, self.cwd, self.reseed)


def decode(payload):
    """Decodes an invocation payload (NUL-terminated fields); ValueError if malformed."""
    if len(payload) > MAX_INVOCATION or not payload.endswith(b"\0"):
        raise ValueError("invocation is too large or unterminated")
    fields = [f.decode("utf-8") for f in payload[:-1].split(b"\0")]
    if len(fields) < 5 or fields[0] != "1" or fields[1] not in ("", "reseed"):
        raise ValueError("not a version 1 invocation")
    cwd = fields[2]
    argc = int(fields[3])
    argv = fields[4:4 + argc]
    rest = fields[4 + argc:]
    if argc < 0 or len(argv) != argc or not rest:
        raise ValueError("bad argument count")
    envc = int(rest[0])
    env = rest[1:]
    if envc < 0 or len(env) != envc:
        raise ValueError("bad environment count")
    pairs = {}
    for e in env:
        k, sep, v = e.partition("=")
        if not sep or not k:
            raise ValueError("bad environment entry %r" % e)
        pairs[k] = v
    return Invocation(argv, pairs, cwd, fields[1] == "reseed")


def receive(path=None):
    """Connects, asks for the run and waits for it: (Invocation, [stdin, stdout, stderr])."""
    s = _connect(path)
    try:
        return _receive(s)
    finally:
        s.close()


def _connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)
    except BaseException:
        s.close()
        raise
    return s


def _receive(s):
    s.sendall(REQUEST)
    head, fds, _flags, _addr = socket.recv_fds(s, 4, 8)
    while len(head) < 4:
        more = s.recv(4 - len(head))
        if not more:
            raise EOFError("the invocation socket closed")
        head += more
    (length,) = struct.unpack("<I", head)
    if length > MAX_INVOCATION:
        raise ValueError("invocation is too large")
    payload = b""
    while len(payload) < length:
        more = s.recv(length - len(payload))
        if not more:
            raise EOFError("the invocation socket closed")
        payload += more
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("the invocation carried %d descriptors, not 3" % len(fds))
    return decode(payload), fds


def reseed():
    """Fresh seeds for what a snapshot would otherwise repeat in every run."""
    random.seed()
    # tempfile's name generator is reseeded only on a pid change. Reset only when the
    # program has the module: importing it here (shutil, bz2, lzma, zlib) would cost the
    # run seconds on an emulating host, and a later import makes a fresh generator anyway.
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile._name_sequence = None


def wait():
    """Blocks until this warm process's run arrives and takes it over; returns it.

    Installs the run's stdin, stdout and stderr as descriptors 0-2 (``sys.stdin`` and
    friends keep working), its working directory and environment (``os.environ``), and
    ``sys.argv`` as the run's arguments; reseeds ``random``. Without ``SMOLVM_INVOKE_SOCKET``
    (not started warm) it returns ``None`` and changes nothing.
    """
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    global _conn
    s = _connect(path)
    try:
        inv, fds = _receive(s)
    except BaseException:
        s.close()
        raise
    _conn = s
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(inv.cwd)
    os.environ.clear()
    os.environ.update(inv.env)
    # The interpreter's own options come before the script in the process's command line:
    # keep as many leading items out of sys.argv as the cold start did.
    try:
        with open("/proc/self/cmdline", "rb") as f:
            own = len(f.read().split(b"\0")) - 1
    except OSError:
        own = len(sys.argv) + 1
    skip = max(own - len(sys.argv), 0)
    sys.argv = inv.argv[skip:] or inv.argv[-1:]
    if inv.reseed:
        reseed()
    return inv


def _status(code):
    """The process status ``sys.exit(code)`` would give, writing its message if any."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def exit(code=0):
    """Ends the run now, as ``sys.exit(code)`` would end the program.

    Warm (after ``wait()``): runs the ``atexit`` handlers, flushes and closes the run's
    stdin, stdout and stderr, reports the status to the agent and leaves with
    ``os._exit``. The run is over at the report; the process's own end (freeing the
    interpreter, unmapping its memory) no longer delays it. Objects are not finalized, as
    with ``os._exit``. Not warm: ``sys.exit(code)``.
    """
    global _conn
    if _conn is None:
        sys.exit(code)
    status = _status(code)
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    for fd in (0, 1, 2):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        _conn.sendall(b"exit %d\n" % status)
    except OSError:
        pass
    os._exit(status)


def run(main, *args):
    """Calls ``main(*args)`` and ends the run with its result, as ``sys.exit(main())``
    would: a return value or a ``SystemExit`` becomes the status (see ``exit``). Other
    exceptions propagate, and the program ends the usual way."""
    try:
        code = main(*args)
    except SystemExit as e:
        code = e.code
    exit(code)
