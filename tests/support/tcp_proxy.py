"""A tiny loopback TCP proxy for injecting network faults between clients and Redis.

Killing Redis only tests the "connection refused / reset" path.  The dangerous case for a lease
holder is a *partition*: sockets stay open, packets vanish, and the client only learns about it
through timeouts while its lease quietly expires on the server.  :meth:`TcpProxy.blackhole`
simulates exactly that; :meth:`TcpProxy.reset_all` simulates abrupt resets.
:meth:`TcpProxy.hold_upstream` keeps a command in flight as long as a test needs (what the
clients sent waits here, readable, while replies still flow).

One named thread runs a ``select`` loop over all sockets (non-blocking, with per-direction
buffers for back-pressure), so a slow reader can never stall other connections.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

_CHUNK = 65536


class _Pair:
    """One proxied connection: the accepted client socket and its upstream socket."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.peer = {client: upstream, upstream: client}
        # Bytes received from one side and not yet written to the socket used as key.
        self.pending: dict[socket.socket, bytes] = {client: b"", upstream: b""}

    def close(self, abrupt: bool = False) -> None:
        for sock in self.peer:
            if abrupt:  # SO_LINGER 0 makes close() send RST instead of FIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``, with fault switches."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((host, 0))
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._pairs: dict[socket.socket, _Pair] = {}
        self._blackholed = False
        self._drop = False
        self._held = False
        #: Bytes read and thrown away while blackholed with ``drop=True``.
        self._dropped = 0
        #: The sockets to the target (the other end of each pair is a client).
        self._upstreams: set[socket.socket] = set()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name=f"tcp-proxy-{self.port}-loop", daemon=True
        )

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def connection_count(self) -> int:
        """Live proxied connections (lets tests wait for a client to have connected)."""
        with self._lock:
            return len(self._pairs) // 2

    @property
    def dropped_bytes(self) -> int:
        """Bytes discarded by ``blackhole(drop=True)`` so far (lets a test wait for a drop)."""
        with self._lock:
            return self._dropped

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop thread and close the listener and every connection."""
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            self._close_all(abrupt=False)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def blackhole(self, drop: bool = False) -> None:
        """Stop all traffic; sockets stay open, so peers see timeouts rather than errors.

        By default bytes are merely not read, so they wait in kernel buffers and are delivered
        on :meth:`heal` (like TCP retransmission after a partition heals: a command a client
        gave up on may still execute later).  ``drop=True`` reads and discards instead (packets
        lost for good; existing streams are then corrupt, so only new connections are useful).
        New connections are still accepted and connected upstream, but carry nothing.
        """
        with self._lock:
            self._blackholed, self._drop = True, drop
        self._wake()

    def heal(self) -> None:
        """Resume forwarding for new and (best effort) existing connections."""
        with self._lock:
            self._blackholed = self._drop = False
        self._wake()

    def hold_upstream(self) -> None:
        """Read what clients send but keep it here, unsent, until :meth:`release_upstream`.

        Replies and pub/sub messages still reach the clients, so a client acts on
        what it hears while its own commands wait (see :meth:`held_bytes`).
        """
        with self._lock:
            self._held = True
        self._wake()

    def release_upstream(self) -> None:
        """Send every held command on to the target, in order, and forward as usual."""
        with self._lock:
            self._held = False
        self._wake()

    def held_bytes(self) -> bytes:
        """What clients sent since :meth:`hold_upstream` that has not reached the target."""
        with self._lock:
            return b"".join(
                pair.pending[sock] for sock, pair in self._pairs.items() if sock in self._upstreams
            )

    def reset_all(self) -> None:
        """Abruptly close (RST) every proxied connection; the listener keeps accepting."""
        with self._lock:
            self._close_all(abrupt=True)
        self._wake()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- loop ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _close_all(self, abrupt: bool) -> None:
        for pair in set(self._pairs.values()):
            pair.close(abrupt)
        self._pairs.clear()
        self._upstreams.clear()

    def _drop_pair(self, pair: _Pair) -> None:
        for sock in pair.peer:
            self._pairs.pop(sock, None)
            self._upstreams.discard(sock)
        pair.close()

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                readers: list[socket.socket] = [self._listener, self._wake_r]
                writers: list[socket.socket] = []
                for sock, pair in self._pairs.items():
                    if self._drop or (not self._blackholed and not pair.pending[pair.peer[sock]]):
                        readers.append(sock)  # back-pressure: read only if peer buffer drained
                    if pair.pending[sock] and not self._blackholed and not self._holding(sock):
                        writers.append(sock)
            try:
                readable, writable, _ = select.select(readers, writers, [], 0.5)
            except (OSError, ValueError):
                continue  # a socket was closed under us by reset_all(); rebuild the lists
            with self._lock:
                if self._stopping:
                    break
                for sock in writable:
                    if sock in self._pairs:
                        self._flush(self._pairs[sock], sock)
                for sock in readable:
                    if sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(_CHUNK)
                    elif sock is self._listener:
                        self._accept()
                    elif sock in self._pairs:
                        self._forward(self._pairs[sock], sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2.0)
        except OSError:
            client.close()  # target down: the client sees the connection close, like a refusal
            return
        pair = _Pair(client, upstream)
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pairs[sock] = pair
        self._upstreams.add(upstream)

    def _holding(self, sock: socket.socket) -> bool:
        """True while bytes bound for ``sock`` must wait (a held command to the target)."""
        return self._held and sock in self._upstreams

    def _forward(self, pair: _Pair, src: socket.socket) -> None:
        if self._blackholed and not self._drop:
            return  # readiness reported by a select() that started before blackhole()
        try:
            data = src.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF or error on one side: close both, as the proxy is transparent
            self._drop_pair(pair)
        elif self._drop:
            self._dropped += len(data)
        else:
            dst = pair.peer[src]
            pair.pending[dst] += data
            self._flush(pair, dst)

    def _flush(self, pair: _Pair, dst: socket.socket) -> None:
        if self._blackholed or self._holding(dst) or not pair.pending[dst]:
            return
        try:
            sent = dst.send(pair.pending[dst])
        except BlockingIOError:
            return
        except OSError:
            self._drop_pair(pair)
            return
        pair.pending[dst] = pair.pending[dst][sent:]
