"""Channels between worker processes: the data plane (and the control path) of `--runtime ray`.

Ray places and restarts the worker processes; it is not on the per-layer path (an actor call
costs ~1 ms here). Instead every pair of processes that exchange data holds one stream socket:
AF_UNIX on one host, TCP across hosts. A message is a small pickled header plus, optionally, one
array. On one host each side also maps a shared-memory segment of its own (a memfd whose file
descriptor crosses the socket once, at connect): an array is copied into the sender's segment
and only the header crosses the socket, which then serves as the doorbell. Across hosts the
array follows the header on the socket.

Why a socket under the shared memory: a receive waits on data, the peer's death and the
deadline together. A peer that dies closes its end (the kernel does it, SIGKILL included), so
its waiters wake at once with ChannelClosed; a hung peer (SIGSTOP) is found when the deadline
passes (ChannelTimeout). Nothing polls: an idle process sleeps in epoll.

One array in flight per direction: a segment holds the last array sent, so a sender may write a
new one only after the peer answered the previous (the request/answer pattern of every user
here: an AW sends a layer's buffer and waits for the answer; an RPC waits for its reply).
`send(..., shm=False)` puts the array on the socket for messages sent without waiting.
"""
from __future__ import annotations

import mmap
import os
import pickle
import select
import socket
import struct
import tempfile
import threading
import time
import uuid

import numpy as np

_HEAD = struct.Struct("<IBQ")        # meta bytes, where the array is (0 none, 1 socket, 2 segment), array bytes
_NONE, _INLINE, _SHM = 0, 1, 2
SEGMENT_BYTES = 1 << 30              # virtual size of a segment: pages are only allocated when touched


class ChannelClosed(ConnectionError):
    """The peer's end closed: its process died or shut the channel."""


class ChannelTimeout(TimeoutError):
    """Nothing arrived from the peer before the deadline (a hung or very slow peer)."""


def _segment() -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("tarragon-channel", os.MFD_CLOEXEC)
    os.ftruncate(fd, SEGMENT_BYTES)
    return fd, mmap.mmap(fd, SEGMENT_BYTES)


class Channel:
    """One connected socket between two processes (and, on one host, a segment each way)."""

    def __init__(self, sock: socket.socket, peer: dict, out_seg: mmap.mmap | None = None,
                 in_seg: mmap.mmap | None = None):
        self.sock, self.peer = sock, peer
        self._out, self._in = out_seg, in_seg
        self.sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head = bytearray(_HEAD.size)
        self._send_lock = threading.Lock()   # a process's keepalive thread sends on its channels too
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, meta, array: np.ndarray | None = None, *, shm: bool = True, timeout: float | None = 30.0,
             lock_s: float | None = None) -> None:
        """Send `meta` (anything picklable, small) and an optional array. ChannelClosed if the
        peer is gone; ChannelTimeout if the socket would not take the message within `timeout`
        (a hung peer that stopped reading; only an array sent inline can fill the socket), or
        another thread's send held the channel for `lock_s` (None: wait for it)."""
        if not self._send_lock.acquire(timeout=-1 if lock_s is None else lock_s):
            raise ChannelTimeout(f"{self.peer.get('name', 'peer')}: channel busy for {lock_s} s")
        try:
            self._send(meta, array, shm, timeout)
        finally:
            self._send_lock.release()

    def _send(self, meta, array: np.ndarray | None, shm: bool, timeout: float | None) -> None:
        if self.closed:
            raise ChannelClosed(f"{self.peer.get('name', 'peer')}: closed")
        where, nbytes, tail = _NONE, 0, []
        if array is not None:
            array = np.ascontiguousarray(array)
            nbytes, flat = array.nbytes, array.reshape(-1).view(np.uint8)
            meta = (meta, array.shape, array.dtype)
            if shm and self._out is not None and nbytes <= SEGMENT_BYTES:
                where = _SHM
                np.frombuffer(self._out, np.uint8, nbytes)[:] = flat
            else:
                where, tail = _INLINE, [memoryview(flat)]
        m = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
        parts = [memoryview(_HEAD.pack(len(m), where, nbytes)), memoryview(m)] + tail
        self.sock.settimeout(timeout)
        try:
            while parts:
                n = self.sock.sendmsg(parts)
                while parts and n >= len(parts[0]):
                    n -= len(parts[0])
                    parts.pop(0)
                if parts:
                    parts[0] = parts[0][n:]
        except socket.timeout:
            raise ChannelTimeout(f"{self.peer.get('name', 'peer')}: not reading within {timeout} s") from None
        except OSError as e:
            self.closed = True
            raise ChannelClosed(f"{self.peer.get('name', 'peer')}: {type(e).__name__}") from None

    def recv(self, timeout: float | None, spin_s: float = 0.0):
        """(meta, array or None): the next message within `timeout` seconds (None: no bound).
        The array is this process's own copy. ChannelClosed: the peer died or closed;
        ChannelTimeout: nothing (or only part of a message) arrived in time. spin_s: poll for
        that long before sleeping (waking a sleeping process costs ~30 us on a VM's core)."""
        if self.closed:
            raise ChannelClosed(f"{self.peer.get('name', 'peer')}: closed")
        end = None if timeout is None else time.monotonic() + timeout
        if spin_s:
            spin(self.sock, spin_s)
        self._read_into(self._head, end)
        mlen, where, nbytes = _HEAD.unpack(self._head)
        meta = pickle.loads(self._read(mlen, end))
        if where == _NONE:
            return meta, None
        meta, shape, dtype = meta
        if where == _SHM:
            array = np.frombuffer(self._in, np.uint8, nbytes).copy()
        else:
            array = np.empty(nbytes, np.uint8)
            self._read_into(memoryview(array), end)
        return meta, array.view(dtype).reshape(shape)

    def _read(self, n: int, end: float | None) -> bytes:
        buf = bytearray(n)
        self._read_into(buf, end)
        return bytes(buf)

    def _read_into(self, buf, end: float | None) -> None:
        view, got = memoryview(buf).cast("B"), 0
        while got < len(view):
            left = None if end is None else max(0.0, end - time.monotonic())
            self.sock.settimeout(left)     # 0 (past the deadline): take what is there, never wait
            try:                           # (a reader that was descheduled past it must not miss an answer)
                n = self.sock.recv_into(view[got:])
            except (socket.timeout, BlockingIOError):
                raise ChannelTimeout(f"{self.peer.get('name', 'peer')}: nothing within the deadline") from None
            except (ConnectionResetError, OSError) as e:
                self.closed = True
                raise ChannelClosed(f"{self.peer.get('name', 'peer')}: {type(e).__name__}") from None
            if n == 0:
                self.closed = True
                raise ChannelClosed(f"{self.peer.get('name', 'peer')}: closed")
            got += n

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def _poller(socks) -> select.poll:
    p = select.poll()
    for s in socks:
        p.register(s, select.POLLIN)
    return p


def spin(sock: socket.socket, seconds: float) -> bool:
    """Poll `sock` for up to `seconds` without sleeping; True once it has data (or closed)."""
    p, end = _poller([sock]), time.perf_counter() + seconds
    while time.perf_counter() < end:
        if p.poll(0):
            return True
    return False


def wait_readable(channels: list, timeout: float | None, spin_s: float = 0.0) -> list:
    """The channels with something to read (or closed), waiting at most `timeout` for the first
    (polling for spin_s of it before sleeping). poll(2), not select(2): a Ray worker process's
    descriptors run past select's 1024."""
    by_fd = {ch.fileno(): ch for ch in channels}
    p, end = _poller(by_fd), time.perf_counter() + spin_s
    ready = p.poll(0)
    while not ready and time.perf_counter() < end:
        ready = p.poll(0)
    if not ready:
        ready = p.poll(None if timeout is None else max(0, int(timeout * 1000)))
    return [by_fd[fd] for fd, _ in ready]


class Listener:
    """A process's listening endpoint: a Unix socket (peers on this host) and a TCP port on
    `host` (peers elsewhere). `address` is what a peer connects to."""

    def __init__(self, host: str = "127.0.0.1", name: str = "worker"):
        self.path = os.path.join(tempfile.gettempdir(), f"tarragon-{name}-{uuid.uuid4().hex[:12]}.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.path)
        self.unix.listen(64)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, 0))
        self.tcp.listen(64)
        self.address = {"unix": self.path, "tcp": (host, self.tcp.getsockname()[1]), "host": host_id()}

    def sockets(self) -> list[socket.socket]:
        return [self.unix, self.tcp]

    def accept(self, listening: socket.socket, me: dict, timeout: float = 10.0) -> Channel:
        """Accept one connection on `listening` (readable) and do the handshake."""
        sock, _ = listening.accept()
        sock.settimeout(timeout)
        if sock.family == socket.AF_UNIX:
            return _unix_handshake(sock, me, first=False)
        ch = Channel(sock, {})
        ch.peer, _ = ch.recv(timeout)
        ch.send(me)
        return ch

    def close(self) -> None:
        for s in self.sockets():
            s.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def connect(address: dict, me: dict, timeout: float = 10.0) -> Channel:
    """A channel to the process listening at `address` (Listener.address): the Unix socket and
    shared memory on the same host, TCP otherwise. ChannelClosed if nobody listens there."""
    try:
        if address["host"] == host_id() and os.path.exists(address["unix"]):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address["unix"])
            return _unix_handshake(sock, me, first=True)
        sock = socket.create_connection(tuple(address["tcp"]), timeout=timeout)
        ch = Channel(sock, {})
        ch.send(me)
        ch.peer, _ = ch.recv(timeout)
        return ch
    except (ConnectionRefusedError, FileNotFoundError, socket.timeout, OSError) as e:
        if isinstance(e, ChannelClosed):
            raise
        raise ChannelClosed(f"cannot connect to {address}: {type(e).__name__}: {e}") from None


def _unix_handshake(sock: socket.socket, me: dict, first: bool) -> Channel:
    """Swap identities and shared-memory segments (their descriptors cross the socket): the
    connecting side sends first."""
    fd, seg = _segment()

    def send():
        socket.send_fds(sock, [pickle.dumps(me)], [fd])

    if first:
        send()
    peer, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    if not fds:
        raise ChannelClosed("closed during the handshake")
    if not first:
        send()
    os.close(fd)
    in_seg = mmap.mmap(fds[0], SEGMENT_BYTES)
    os.close(fds[0])
    return Channel(sock, pickle.loads(peer), seg, in_seg)


def host_id() -> str:
    """This machine (Unix sockets and shared memory work only between processes of one host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()}:{f.read().strip()}"
    except OSError:
        return socket.gethostname()
