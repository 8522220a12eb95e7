"""Raw HTTP/2 gRPC clients that a stock stub cannot be: they open calls and never finish
them. Built on the ``h2`` package; used by tests and ``bench_soak``.

- :class:`StalledCalls`: one connection whose calls send HEADERS and no DATA (``drip``
  None), or a message prefix and then one byte per ``drip`` seconds, forever.
- :class:`UnreadCall`: one call whose request is sent whole, but whose response is never
  read past the flow-control window (the client grants no more); with ``reads=False`` the
  client reads nothing at all from its socket (a frozen client).
- :class:`UploadCall`: one call that sends its request only as far as the server's
  flow-control window lets it, and counts the bytes the server let in.

A reader thread per connection (unless ``reads=False``) answers the server's SETTINGS and
PINGs (an honest peer in every way but the one under test) until :meth:`close`.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

READ_BYTES = 65536


class _Connection:
    def __init__(
        self, host: str, port: int, *, window: int | None = None, reads: bool = True
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        if not reads:  # a small receive buffer: the server's writes stall at once
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(None)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.authority = f"{host}:{port}"
        self.lock = threading.Lock()
        self.events: list[object] = []
        self.closed = threading.Event()
        self.h2.initiate_connection()
        if window is not None:  # the window the server may fill before the client reads
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.flush()
        if reads:
            threading.Thread(target=self._read, name="hostile-h2-reader", daemon=True).start()

    def flush(self) -> None:
        with self.lock:
            data = self.h2.data_to_send()
            if data:
                self.sock.sendall(data)

    def open_call(self, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        with self.lock:
            stream_id = self.h2.get_next_available_stream_id()
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", self.authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *metadata,
            ]
            self.h2.send_headers(stream_id, headers, end_stream=False)
        self.flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        with self.lock:
            self.h2.send_data(stream_id, data, end_stream=end)
        self.flush()

    def send_all(self, stream_id: int, data: bytes, *, seconds: float = 60.0) -> None:
        """Send ``data`` as the server's flow-control window allows (the reader thread
        takes its WINDOW_UPDATEs)."""
        deadline = time.monotonic() + seconds
        while data:
            with self.lock:
                room = min(
                    self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
                )
                if room > 0:
                    self.h2.send_data(stream_id, data[:room])
                    data = data[room:]
            self.flush()
            if room <= 0:
                if time.monotonic() > deadline:
                    raise TimeoutError("the server granted no flow-control window")
                time.sleep(0.005)

    def _read(self) -> None:
        try:
            while not self.closed.is_set():
                data = self.sock.recv(READ_BYTES)
                if not data:
                    return
                with self.lock:
                    events = self.h2.receive_data(data)
                    self.events.extend(
                        e for e in events if not isinstance(e, h2.events.DataReceived)
                    )
                self.flush()  # SETTINGS and PING acks only: no WINDOW_UPDATE is ever sent
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            self.closed.set()

    def status(self, stream_id: int) -> tuple[str | None, str | None]:
        """(grpc-status, grpc-message) the server sent for ``stream_id``, or Nones."""
        with self.lock:
            for event in self.events:
                headers = dict(getattr(event, "headers", None) or ())
                if getattr(event, "stream_id", None) == stream_id and "grpc-status" in headers:
                    return headers["grpc-status"], headers.get("grpc-message")
        return None, None

    def ended_streams(self) -> set[int]:
        with self.lock:
            return {e.stream_id for e in self.events if isinstance(e, h2.events.StreamEnded)}

    def close(self) -> None:
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class StalledCalls:
    """``count`` calls of ``path`` on one connection that never send a whole request."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        count: int,
        *,
        drip: float | None = None,
        declared_bytes: int = 1 << 20,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.connection = _Connection(host, port)
        self.streams = [self.connection.open_call(path, metadata) for _ in range(count)]
        self._stop = threading.Event()
        self._dripper = None
        if drip is not None:
            prefix = struct.pack(">BI", 0, declared_bytes)  # a message of declared_bytes
            for stream_id in self.streams:
                self.connection.send(stream_id, prefix)
            self._dripper = threading.Thread(
                target=self._drip, args=(drip,), name="hostile-h2-drip", daemon=True
            )
            self._dripper.start()

    def _drip(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for stream_id in self.streams:
                try:
                    self.connection.send(stream_id, b"\0")
                except Exception:  # noqa: BLE001 - the server may end the call: stop dripping
                    return

    def ended(self) -> int:
        """How many of the calls the server has ended (a status sent)."""
        return len(self.connection.ended_streams() & set(self.streams))

    def close(self) -> None:
        self._stop.set()
        self.connection.close()


class UnreadCall:
    """One call whose request is sent whole and whose response is never read: the client
    grants the server ``window`` bytes of flow control and no more."""

    def __init__(
        self, host: str, port: int, path: str, request: bytes, *, window=65535, reads=True
    ):
        self.connection = _Connection(host, port, window=window, reads=reads)
        self.stream = self.connection.open_call(path)
        self.connection.send_all(self.stream, struct.pack(">BI", 0, len(request)) + request)
        self.connection.send(self.stream, b"", end=True)

    def ended(self) -> bool:
        return self.stream in self.connection.ended_streams()

    def close(self) -> None:
        self.connection.close()


class UploadCall:
    """One call whose ``request`` is sent as far as the server's flow-control window lets
    it, never waiting for more: :attr:`sent` is how many bytes the server let in."""

    def __init__(self, host: str, port: int, path: str, request: bytes) -> None:
        self.connection = _Connection(host, port)
        self.stream = self.connection.open_call(path)
        self._data = struct.pack(">BI", 0, len(request)) + request
        self.sent = 0
        self.send_window()

    def send_window(self) -> int:
        """Send what the window allows now; the bytes sent so far."""
        connection = self.connection
        with connection.lock:
            while self.sent < len(self._data) and self.stream not in self._ended():
                room = min(
                    connection.h2.local_flow_control_window(self.stream),
                    connection.h2.max_outbound_frame_size,
                    len(self._data) - self.sent,
                )
                if room <= 0:
                    break
                end = self.sent + room == len(self._data)
                try:
                    connection.h2.send_data(
                        self.stream, self._data[self.sent : self.sent + room], end_stream=end
                    )
                except h2.exceptions.ProtocolError:  # the server closed the stream
                    break
                self.sent += room
        connection.flush()
        return self.sent

    def _ended(self) -> set[int]:
        return {e.stream_id for e in self.connection.events if isinstance(e, h2.events.StreamEnded)}

    def status(self) -> tuple[str | None, str | None]:
        return self.connection.status(self.stream)

    def close(self) -> None:
        self.connection.close()
