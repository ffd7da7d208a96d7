"""What `kvtriton serve`'s HTTP guard costs a server-sent event: CPU time per event, through it and directly.

A stand-in upstream (no tritonserver: the relay alone is measured) streams N events framed as Triton frames
generate_stream's (chunked, one event a chunk), either paced (each event its own write, `--pace` seconds apart,
as a decoding engine's tokens arrive) or in a burst (as fast as it can write: many events a read). The client,
the upstream and the guard share this process, so the figure is the process's CPU time per event; the guard's
own cost is the difference to the direct run beside it. Rounds alternate direct and guarded.

  python benchmarks/http_guard_bench.py [--events 5000] [--pace 0.0001] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import platform
import resource
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvtriton.backend.entrypoints.http_guard import HttpGuard
from kvtriton.backend.entrypoints.tritonserver import free_ports

EVENT = b'data: {"model_name":"llm","model_version":"1","text_output":" word","finish_reason":""}\n\n'


def upstream_handler(events: int, pace: float) -> type[BaseHTTPRequestHandler]:
    class Upstream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(events):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
                self.wfile.flush()
                if pace:
                    time.sleep(pace)
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    return Upstream


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stream_once(port: int, events: int) -> float:
    """CPU microseconds per event of one generate_stream-like request on `port`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = cpu_seconds()
    conn.request("POST", "/v2/models/llm/generate_stream", body=b"{}")
    body = conn.getresponse().read()
    spent = cpu_seconds() - start
    conn.close()
    assert body.count(b"data: ") == events, "events lost"
    return spent / events * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--pace", type=float, default=0.0001, help="seconds between paced events")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"# Python {platform.python_version()} on {platform.machine()}, {args.events} events a request, "
          f"{args.rounds} rounds alternated; CPU us per event (client + stand-in upstream + guard, one process)")
    for pace in (args.pace, 0.0):
        upstream = ThreadingHTTPServer(("127.0.0.1", 0), upstream_handler(args.events, pace))
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        guard = HttpGuard("127.0.0.1", free_ports(1)[0], upstream.server_address[1], max_body_bytes=1 << 20)
        guard.start()
        runs: dict[str, list[float]] = {"direct": [], "guard": []}
        for _ in range(args.rounds):
            runs["direct"].append(stream_once(upstream.server_address[1], args.events))
            runs["guard"].append(stream_once(guard.port, args.events))
        upstream.shutdown()  # the guard's thread is a daemon: it goes with the process
        direct, guarded = statistics.median(runs["direct"]), statistics.median(runs["guard"])
        label = f"paced {pace * 1e3:g} ms" if pace else "burst"
        print(f"{label:>14}: direct {direct:6.1f} us, through the guard {guarded:6.1f} us "
              f"(the guard: {guarded - direct:+.1f} us an event; runs {', '.join(f'{v:.1f}' for v in runs['guard'])})",
              flush=True)


if __name__ == "__main__":
    main()
