"""A fault-injecting HTTP/1.1 proxy for S3 tests (stdlib only), in front of moto or Ceph radosgw.

It runs an asyncio loop in a daemon thread of the test process and relays requests one by one per
connection, so it understands just enough HTTP framing: request bodies with Content-Length (what
botocore sends when no aws-chunked checksum trailer is asked for), `Expect: 100-continue` (botocore
sends it on every PUT of a file, and Werkzeug never answers it), and responses framed by
Content-Length, chunked encoding or EOF, with HEAD/204/304 bodiless.

Faults are queued with `status`, `reset_mid_request`, `truncate_response` and `stall`; each matches
an optional method and a substring of the request target (e.g. `partNumber=`), lets `skip` matching
requests pass, then fires `times` times. Counters: `injected` (faults fired), `requests` (seen).

    proxy = FaultProxy("127.0.0.1", moto_port)
    port = proxy.start()
    proxy.status(503, method="PUT", contains="partNumber=", times=3)
    ...  # talk to http://127.0.0.1:{port}
    assert proxy.injected == 3
    proxy.stop()
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass
from typing import NamedTuple

REASONS = {500: "Internal Server Error", 503: "Service Unavailable", 429: "Too Many Requests"}
CODES = {500: "InternalError", 503: "SlowDown", 429: "SlowDown"}
COPY_BLOCK = 256 * 1024


class Seen(NamedTuple):
    """One request as the proxy saw it."""

    method: str
    target: str
    action: str  # the fault that fired, or "pass"
    headers: dict[str, str]  # lower-case names


@dataclass
class Fault:
    action: str  # status | reset_mid_request | truncate_response | stall
    method: str | None = None
    contains: str | None = None  # substring of the request target (path and query)
    times: int = 1
    skip: int = 0  # matching requests let through before the fault starts firing
    status: int = 503
    after_bytes: int = 0  # body bytes relayed before the connection is cut
    seconds: float = 0.0
    reset: bool = False  # truncate_response: RST instead of a clean close after the partial body

    def matches(self, method: str, target: str) -> bool:
        return (
            self.times > 0
            and (self.method is None or self.method == method)
            and (self.contains is None or self.contains in target)
        )


class FaultProxy:
    """Relays 127.0.0.1:<port> to an upstream S3 server, injecting the queued faults."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.port = 0
        self.requests = 0
        self.injected = 0
        self.log: list[Seen] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    # --- the fault schedule ------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def status(self, status: int = 503, **match) -> Fault:
        """Answer with an S3 XML error (503 SlowDown, 500 InternalError) instead of forwarding."""
        return self.add(Fault("status", status=status, **match))

    def reset_mid_request(self, after_bytes: int = 1 << 20, **match) -> Fault:
        """Forward `after_bytes` of the request body, then reset the client's connection."""
        return self.add(Fault("reset_mid_request", after_bytes=after_bytes, **match))

    def truncate_response(self, after_bytes: int, reset: bool = False, **match) -> Fault:
        """Relay only `after_bytes` of the response body, then close the client's connection. A clean
        close (FIN) delivers exactly `after_bytes`; `reset=True` sends an RST, which may also discard
        bytes still in flight, as a crashed server would."""
        return self.add(Fault("truncate_response", after_bytes=after_bytes, reset=reset, **match))

    def stall(self, seconds: float, **match) -> Fault:
        """Hold the request for `seconds` before forwarding it."""
        return self.add(Fault("stall", seconds=seconds, **match))

    def pending(self) -> int:
        """Faults still queued to fire."""
        with self._lock:
            return sum(fault.times for fault in self._faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _pick(self, method: str, target: str, headers: dict[str, str]) -> Fault | None:
        with self._lock:
            self.requests += 1
            chosen = None
            for fault in self._faults:
                if fault.matches(method, target):
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.times -= 1
                    self.injected += 1
                    chosen = fault
                    break
            self.log.append(Seen(method, target, chosen.action if chosen else "pass", headers))
            return chosen

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> int:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.listen_host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self.port

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            asyncio.get_running_loop().stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(10)
        self._loop = None

    # --- relaying ----------------------------------------------------------------------------------

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(client_w)
            return
        try:
            while await self._relay_one(client_r, client_w, up_r, up_w):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_w, up_w):
                writer.close()

    async def _relay_one(self, client_r, client_w, up_r, up_w) -> bool:
        """Relay one request and its response; False when the connection is done."""
        try:
            head = await client_r.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        request_line, headers = _parse_head(head)
        method, target = request_line.split(" ")[:2]
        length = int(headers.get("content-length", "0") or 0)
        expect = headers.get("expect", "").lower() == "100-continue"
        fault = self._pick(method, target, headers)
        if fault and fault.action == "stall":
            await asyncio.sleep(fault.seconds)
        if fault and fault.action == "status":
            await _answer_error(client_r, client_w, fault.status, length if not expect else 0)
            return False
        up_w.write(head)
        if fault and fault.action == "reset_mid_request":
            await _send_body(client_r, client_w, up_r, up_w, length, expect, limit=fault.after_bytes)
            _reset(client_w)
            return False
        status_line, response_headers, response_head = await _send_body(client_r, client_w, up_r, up_w, length, expect)
        cut = fault if fault and fault.action == "truncate_response" else None
        if not await _relay_response(up_r, client_w, method, status_line, response_headers, response_head, cut):
            return False
        return response_headers.get("connection", "").lower() != "close"


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed server or a dropped link looks to a client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def _answer_error(client_r, client_w, status: int, body_length: int) -> None:
    if body_length:  # drain what the client already sent, so it reads our answer rather than a reset
        await client_r.readexactly(body_length)
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{CODES.get(status, "InternalError")}'
        f"</Code><Message>injected by faultproxy</Message></Error>"
    ).encode()
    client_w.write(
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await client_w.drain()


async def _read_response_head(up_r) -> tuple[str, dict[str, str], bytes]:
    head = await up_r.readuntil(b"\r\n\r\n")
    status_line, headers = _parse_head(head)
    return status_line, headers, head


def _status_of(status_line: str) -> str:
    return status_line.split(" ")[1]


async def _send_body(client_r, client_w, up_r, up_w, length: int, expect: bool, limit: int | None = None):
    """Forward the request body and return the final response head (None when `limit` cut it).

    With `Expect: 100-continue` whichever comes first wins: the server's interim or final answer, or
    the client giving up waiting (botocore waits 1 s) and sending the body anyway."""
    remaining = length if limit is None else min(limit, length)
    upstream_head = asyncio.ensure_future(_read_response_head(up_r)) if (expect or limit is None) else None
    if expect and length:
        first_byte = asyncio.ensure_future(client_r.read(1))
        done, _ = await asyncio.wait({upstream_head, first_byte}, return_when=asyncio.FIRST_COMPLETED)
        if upstream_head in done and _status_of(upstream_head.result()[0]) != "100":
            first_byte.cancel()  # an early final answer: the client will not send the body
            return upstream_head.result()
        if upstream_head in done:  # 100 Continue: pass it on, then the body follows
            client_w.write(upstream_head.result()[2])
            await client_w.drain()
            upstream_head = asyncio.ensure_future(_read_response_head(up_r))
        first = await first_byte
        if not first:
            raise ConnectionError("client closed")
        up_w.write(first)
        remaining -= len(first)
    await _copy(client_r, up_w, remaining)
    if limit is not None:
        if upstream_head:
            upstream_head.cancel()
        return None
    head = await upstream_head
    while _status_of(head[0]) == "100":  # a late interim answer after the body was sent
        client_w.write(head[2])
        head = await _read_response_head(up_r)
    return head


async def _copy(reader, writer, count: int) -> None:
    while count > 0:
        data = await reader.read(min(COPY_BLOCK, count))
        if not data:
            raise ConnectionError("short body")
        writer.write(data)
        await writer.drain()
        count -= len(data)


async def _relay_response(
    up_r, client_w, method: str, status_line: str, headers: dict[str, str], head: bytes, cut: Fault | None
) -> bool:
    """Relay a response; with a `cut` fault, close the client after that many body bytes (False)."""
    client_w.write(head)
    budget = [cut.after_bytes if cut else None]

    async def put(data: bytes) -> bool:
        if cut is not None and budget[0] is not None:
            if len(data) >= budget[0]:
                client_w.write(data[: budget[0]])
                await client_w.drain()
                if cut.reset:
                    _reset(client_w)
                else:
                    client_w.close()
                return False
            budget[0] -= len(data)
        client_w.write(data)
        await client_w.drain()
        return True

    code = int(_status_of(status_line))
    if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
        await client_w.drain()
        return True
    if "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await up_r.read(min(COPY_BLOCK, remaining))
            if not data:
                raise ConnectionError("upstream short body")
            remaining -= len(data)
            if not await put(data):
                return False
        return True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _relay_chunked(up_r, put)
    while data := await up_r.read(COPY_BLOCK):  # no framing: the body runs to EOF
        if not await put(data):
            return False
    return False


async def _relay_chunked(up_r, put) -> bool:
    while True:
        line = await up_r.readuntil(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if not await put(line):
            return False
        if size == 0:
            trailer = b""
            while (part := await up_r.readuntil(b"\r\n")) != b"\r\n":
                trailer += part
            return await put(trailer + b"\r\n")
        if not await put(await up_r.readexactly(size + 2)):
            return False
