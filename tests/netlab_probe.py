"""Measure a link between two netlab hosts: run as ``serve PORT`` on one and
``measure HOST PORT MEGABYTES`` on the other (prints a JSON line: rtt_s, the fastest of 20
round trips, which is the link's own (time the relays wait for a busy CPU only adds to the
others); median_rtt_s; mbit_s)."""

import json
import socket
import sys
import time

PINGS = 20

if sys.argv[1] == "serve":
    with socket.create_server(("0.0.0.0", int(sys.argv[2]))) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        for _ in range(PINGS):
            conn.sendall(conn.recv(1))
        while conn.recv(1 << 20):
            pass
        conn.sendall(b"done")
else:
    host, port, megabytes = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    conn = socket.create_connection((host, port), timeout=30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(PINGS):
        start = time.perf_counter()
        conn.sendall(b"x")
        conn.recv(1)
        rtts.append(time.perf_counter() - start)
    start = time.perf_counter()
    block = bytes(1 << 20)
    for _ in range(megabytes):
        conn.sendall(block)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(4)
    seconds = time.perf_counter() - start
    rtts.sort()
    print(
        json.dumps(
            {"rtt_s": rtts[0], "median_rtt_s": rtts[PINGS // 2], "mbit_s": megabytes * 8 * 2**20 / seconds / 1e6}
        )
    )
