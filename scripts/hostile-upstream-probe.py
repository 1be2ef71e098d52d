#!/usr/bin/env python3
"""Measures what a hostile upstream costs a real offload binary (issue 16). Standard library only.

    scripts/hostile-upstream-probe.py BINARY event [--mb 8] [--piece 4096]
        one stream request whose upstream sends one event of that many MB (then [DONE]), in HTTP chunks of
        --piece bytes (each reaches the server as a piece of at most that size); prints the server's CPU time
        (user + system, from /proc) spent on the request, and how it ended.
    scripts/hostile-upstream-probe.py BINARY raw-readers [--mb 60] [--readers 10]
        one async request whose upstream replies that many MB, then that many slow readers of its `.raw` at once;
        prints the server's resident memory before and at its peak while they read.

The upstream runs in this process on loopback; the server gets a fresh data directory and a free port.
"""

import argparse
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chunk_event(content):
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return ("data: " + json.dumps(chunk) + "\n\n").encode()


def upstream(body, content_type, piece):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for at in range(0, len(body), piece):
                part = body[at:at + piece]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def memory_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def request(port, method, path, body=None, timeout=300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def path_of(url):
    return "/" + url.split("/", 3)[3]


def start(binary, upstream_port):
    port = free_port()
    data = tempfile.mkdtemp(prefix="offload-probe-")
    server = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
         "--upstream-url", f"http://127.0.0.1:{upstream_port}/v1", "--upstream-retries", "0",
         "--max-timeout", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            if request(port, "GET", "/healthz", timeout=1)[0] == 200:
                return server, port
        except OSError:
            time.sleep(0.05)
    server.kill()
    sys.exit("the server did not start")


def wait_final(port, status_url):
    while True:
        status, data = request(port, "GET", path_of(status_url))
        doc = json.loads(data)
        if doc["status"] in ("done", "error", "stop"):
            return doc, len(data)
        time.sleep(0.1)


def event(args):
    body = chunk_event("x" * (args.mb * 1_000_000)) + b"data: [DONE]\n\n"
    up = upstream(body, "text/event-stream", args.piece)
    server, port = start(args.binary, up.server_address[1])
    try:
        before = cpu_seconds(server.pid)
        started = time.monotonic()
        _, data = request(port, "POST", "/v1/stream-chatgpt",
                          {"messages": [{"role": "user", "content": "hi"}], "timeout": 600})
        doc, size = wait_final(port, json.loads(data)["endpoints"]["status_url"])
        print(json.dumps({"event_mb": args.mb, "piece_bytes": args.piece,
                          "cpu_s": round(cpu_seconds(server.pid) - before, 2),
                          "wall_s": round(time.monotonic() - started, 2), "status": doc["status"],
                          "error": doc.get("error", {}).get("code"),
                          "max_rss_mib": memory_kib(server.pid, "VmHWM") // 1024}))
    finally:
        server.kill()
        up.shutdown()


def raw_readers(args):
    content = "z" * (args.mb * 1_000_000)
    completion = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                               "finish_reason": "stop"}]}
    up = upstream(json.dumps(completion).encode(), "application/json", 64 * 1024)
    server, port = start(args.binary, up.server_address[1])
    try:
        _, data = request(port, "POST", "/v1/async-chatgpt",
                          {"messages": [{"role": "user", "content": "hi"}], "timeout": 600})
        doc, _ = wait_final(port, json.loads(data)["endpoints"]["status_url"])
        time.sleep(1)
        rss_before = memory_kib(server.pid, "VmRSS")
        peak = [rss_before]
        raw_path = path_of(doc["endpoints"]["response_raw_url"])
        sizes = []

        def slow_reader():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("GET", raw_path)
            response = conn.getresponse()
            read = 0
            while True:
                part = response.read(256 * 1024)
                if not part:
                    break
                read += len(part)
                time.sleep(0.02)
            sizes.append(read)
            conn.close()

        readers = [threading.Thread(target=slow_reader) for _ in range(args.readers)]
        for r in readers:
            r.start()
        while any(r.is_alive() for r in readers):
            peak.append(memory_kib(server.pid, "VmRSS"))
            time.sleep(0.05)
        print(json.dumps({"reply_mb": args.mb, "readers": args.readers, "status": doc["status"],
                          "raw_bytes_each": sorted(set(sizes)),
                          "rss_before_mib": rss_before // 1024, "rss_peak_mib": max(peak) // 1024}))
    finally:
        server.kill()
        up.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    sub = parser.add_subparsers(dest="probe", required=True)
    e = sub.add_parser("event")
    e.add_argument("--mb", type=int, default=8)
    e.add_argument("--piece", type=int, default=4096)
    r = sub.add_parser("raw-readers")
    r.add_argument("--mb", type=int, default=60)
    r.add_argument("--readers", type=int, default=10)
    args = parser.parse_args()
    {"event": event, "raw-readers": raw_readers}[args.probe](args)


if __name__ == "__main__":
    main()
