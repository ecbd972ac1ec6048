#!/usr/bin/env python3
"""Open N keep-alive connections to a proxy, complete one request on each, then hold them idle.

Used by bench/run.sh to measure a proxy's RSS with many idle application connections. Writes
"ok <opened> failed <failed>" to --ready-file once every connection has been tried, then
holds the sockets open until killed or until --hold seconds have passed (a deadline, so a
forgotten holder can never linger).
"""

import argparse
import socket
import sys
import time


def read_response(sock: socket.socket) -> bool:
    """Read one HTTP/1.1 response (Content-Length or chunked); True on a 2xx."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split()
    ok = len(parts) >= 2 and parts[1].startswith(b"2")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        want = int(headers[b"content-length"])
        while len(body) < want:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            body += chunk
        return ok
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                return False
            body += chunk
        return ok
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--host", default="upstream.bench.local", help="Host header")
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--hold", type=float, default=120.0, help="seconds to hold, at most")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-connection deadline")
    args = ap.parse_args()

    request = f"GET / HTTP/1.1\r\nHost: {args.host}\r\n\r\n".encode()
    socks = []
    failed = 0
    for _ in range(args.count):
        try:
            s = socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout)
            s.sendall(request)
            if read_response(s):
                socks.append(s)
            else:
                failed += 1
                s.close()
        except OSError:
            failed += 1
    with open(args.ready_file, "w", encoding="ascii") as f:
        f.write(f"ok {len(socks)} failed {failed}\n")
    deadline = time.monotonic() + args.hold
    while time.monotonic() < deadline:
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
