"""Benchmark: the search service (``serve``) under concurrent image uploads on loopback.

Runs the real pipeline: ``experiments/v1.py predict --splits db`` extracts the synthetic benchmark's
database features into a temporary ``--out-root``, then ``experiments/v1.py serve`` answers on 127.0.0.1
(output in ``server.log`` there). After ``--warmup`` requests, for each ``--clients`` count c, c threads
send ``POST /search`` uploads (the benchmark's query images, read once into memory and cycled, each with
its query box as ``bbx``) over keep-alive ``http.client`` connections: ``--requests`` per level, none sent
after the level has run ``--max-seconds``. Per level: requests finished, errors (non-200 or connection
failures), seconds, throughput, client latency percentiles (ms) and the means of the server's
``timing_ms``. Server memory: VmRSS once ready (``server_rss_mb_idle``), VmHWM after the last level
(``server_peak_rss_mb``). Data go to ``--data-root`` (default ``<tmp>/retrieval_bench_data``, kept
and reused: the default size takes a few minutes to generate the first time). Prints JSON.
Usage: .venv/bin/python scripts/bench_serve.py [--size default --clients 1,4,16 --requests 64 --rerank aqe]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from retrieval.data import load_dataset

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "v1.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status_mb(pid: int, key: str) -> float:
    """``key`` (VmRSS, VmHWM) of process ``pid`` from /proc/<pid>/status, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise KeyError(key)


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def predict_db(base: list[str], env: dict[str, str]) -> Path:
    """Run ``predict --splits db``; the features file it printed."""
    out = subprocess.run([*base, "predict", "--splits", "db"], env=env, capture_output=True, text=True)
    paths = [line.strip() for line in out.stdout.splitlines() if line.strip().endswith(".h5")]
    if out.returncode != 0 or not paths:
        sys.exit(f"predict failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return Path(paths[-1])


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> dict:
    """Poll ``GET /health`` until it answers 200; exit with the log tail if the server dies or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with rc {proc.returncode} before answering; {log} ends:\n{tail(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            status, body = get(port, "/health")
            if status == 200:
                return body
        time.sleep(0.5)
    sys.exit(f"server not healthy after {timeout:.0f} s; {log} ends:\n{tail(log)}")


def connect(port: int, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def get(port: int, path: str) -> tuple[int, dict]:
    conn = connect(port)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def multipart(fields: dict[str, str], name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with text ``fields`` and one JPEG file field ``image``; (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def run_level(port: int, bodies: list[tuple[bytes, str]], clients: int, total: int, max_seconds: float) -> list:
    """``total`` uploads from ``clients`` threads; one (latency s, status, timing_ms or None) per finished request."""
    results: list[tuple[float, int, dict | None]] = []
    lock = threading.Lock()
    counter = iter(range(total))
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        conn = connect(port, max_seconds + 120)
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, ctype = bodies[i % len(bodies)]
            start = time.perf_counter()
            try:
                conn.request("POST", "/search", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                payload, status = resp.read(), resp.status
                timing = json.loads(payload).get("timing_ms") if status == 200 else None
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()  # reconnects on the next request
                status, timing = 0, None
            with lock:
                results.append((time.perf_counter() - start, status, timing))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile of a sorted list."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarise(clients: int, results: list, seconds: float) -> dict:
    lat = sorted(1000 * r[0] for r in results if r[1] == 200)
    timings = [r[2] for r in results if r[2]]
    return {
        "clients": clients, "requests": len(results), "errors": sum(r[1] != 200 for r in results),
        "error_statuses": sorted({r[1] for r in results if r[1] != 200}),
        "seconds": round(seconds, 3), "throughput_rps": round(len(lat) / seconds, 3) if seconds else None,
        "latency_ms": {f"p{q}": round(percentile(lat, q), 1) if lat else None for q in (50, 95, 99)}
        | {"mean": round(sum(lat) / len(lat), 1) if lat else None},
        "server_timing_ms": {key: round(sum(t.get(key, 0.0) for t in timings) / len(timings), 2) if timings
                             else None for key in ("queue", "embed", "search", "rerank")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="synthetic benchmark size (tiny, default: 900 images, large)")
    parser.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "retrieval_bench_data",
                        help="datasets folder (kept: later runs reuse the generated images)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per level, comma-separated")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per level: send no new request after this")
    parser.add_argument("--rerank", default="none", help="chain the server offers and every request asks for")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--port", type=int, default=None, help="[default: a free port]")
    parser.add_argument("--warmup", type=int, default=3, help="requests sent before measuring")
    parser.add_argument("--health-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    port = args.port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        base = [sys.executable, str(EXPERIMENT), "--out-root", str(Path(tmp) / "out"), "--set",
                f"synthetic_size={json.dumps(args.size)}", "--data-root", str(args.data_root)]
        features = predict_db(base, env)
        ds = load_dataset("synthetic", args.data_root, args.size)
        fields = {"k": str(args.k), "rerank": args.rerank}
        bodies = [multipart({**fields, **({"bbx": ",".join(f"{v:g}" for v in ds.queries.bbx(i))}
                                          if ds.queries.bbx(i) else {})}, path.name, path.read_bytes())
                  for i, path in enumerate(ds.queries.paths)]
        log = Path(tmp) / "server.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen([*base, "serve", "--features", str(features), "--port", str(port), "--rerank",
                                     args.rerank], env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            health = wait_healthy(proc, port, log, args.health_timeout)
            info = get(port, "/info")[1]
            rss_idle = proc_status_mb(proc.pid, "VmRSS")
            warm = run_level(port, bodies, 1, args.warmup, args.max_seconds)
            if any(r[1] != 200 for r in warm):
                sys.exit(f"warm-up failed (statuses {[r[1] for r in warm]}); {log} ends:\n{tail(log)}")
            rows = []
            for clients in levels:
                start = time.perf_counter()
                results = run_level(port, bodies, clients, args.requests, args.max_seconds)
                rows.append(summarise(clients, results, time.perf_counter() - start))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            peak = proc_status_mb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    report = {"benchmark": "serve", "size": args.size, "index_size": health.get("index_size"),
              "image_size": info.get("embedding", {}).get("image_size"), "queries": len(bodies),
              "rerank": args.rerank, "k": args.k, "levels": rows, "server_peak_rss_mb": peak,
              "server_rss_mb_idle": rss_idle, "cpu_count": os.cpu_count()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
