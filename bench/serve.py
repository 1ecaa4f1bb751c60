"""Load on `m3 serve`, side by side in one run: the same requests sent one by one, then by N
concurrent clients, against one live server (started here, on a free port).

    .venv/bin/python bench/serve.py --bank out/demo/kb.m3bank --model samples/model --clients 16
    .venv/bin/python bench/serve.py --bank kb.m3bank --clients 16 --requests 32 --max-tokens 64
    .venv/bin/python bench/serve.py --bank kb.m3bank --clients 16 --requests 32 --max-tokens 64 --dtype bf16

Prints one JSON line per phase (requests/s, tokens/s, p50/p99 latency, p50/p99 time to first
token, failures) and the ratio of concurrent to sequential tokens/s. Requests are streamed chat
or text completions through the official `openai` client, greedy, in memory mode.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def one_request(client, prompt: str, max_tokens: int, mode: str) -> dict:
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = client.completions.create(
        model="m3", prompt=prompt, max_tokens=max_tokens, stream=True, extra_body={"mode": mode}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
        usage = (chunk.model_extra or {}).get("usage") or getattr(chunk, "usage", None)
        if usage:
            n = usage["completion_tokens"] if isinstance(usage, dict) else usage.completion_tokens
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": n}


def phase(name: str, url: str, prompts: list[str], clients: int, max_tokens: int, mode: str) -> dict:
    import openai

    results: list[dict] = []
    failures = []
    lock = threading.Lock()
    work = list(prompts)

    def worker():
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key=os.environ.get("M3_API_KEY", "none"), max_retries=0, timeout=600
        )
        while True:
            with lock:
                if not work:
                    return
                prompt = work.pop()
            try:
                r = one_request(client, prompt, max_tokens, mode)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001
                with lock:
                    failures.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    return {
        "phase": name,
        "clients": clients,
        "requests": len(results),
        "failed": len(failures),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(percentile(lat, 0.5), 3),
        "latency_p99_s": round(percentile(lat, 0.99), 3),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3),
        "ttft_p99_s": round(percentile(ttft, 0.99), 3),
        "failures": failures[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", required=True)
    ap.add_argument("--model", default=None, help="default: the model the bank names ($M3_MODEL first)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=None, help="default: --clients")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mode", default="memory")
    ap.add_argument("--qa", default=None, help="JSONL with {question}: the prompts (default: generic ones)")
    ap.add_argument("--dtype", default=None, help="the server's --dtype (default: its own, auto)")
    a = ap.parse_args()
    n = a.requests or a.clients
    if a.qa:
        qs = [json.loads(line)["question"] for line in Path(a.qa).read_text().splitlines() if line.strip()]
    else:
        topics = ["Ilsa Varenkov", "Tomas Quillfeather", "the Northwind Institute", "Port Adler", "marine chemistry"]
        qs = [f"Here is a long, detailed story about {topics[i % len(topics)]}, part {i + 1}:" for i in range(n)]
    prompts = [f"Question: {qs[i % len(qs)]} Answer:" if a.qa else qs[i % len(qs)] for i in range(n)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = (
        [
            str(Path(sys.executable).parent / "m3"),
            "serve",
            "--bank",
            a.bank,
            "--port",
            str(port),
            "--batch-size",
            str(a.clients),
        ]
        + (["--model", a.model] if a.model else [])
        + (["--dtype", a.dtype] if a.dtype else [])
    )
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read() if server.stderr else ''}")
                time.sleep(0.5)
        phase("warm-up", url, prompts[:2], 1, a.max_tokens, a.mode)
        seq = phase("sequential", url, prompts, 1, a.max_tokens, a.mode)
        print(json.dumps(seq), flush=True)
        con = phase("concurrent", url, prompts, a.clients, a.max_tokens, a.mode)
        print(json.dumps(con), flush=True)
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            h = json.loads(r.read())
        print(
            json.dumps(
                {
                    "ratio_tokens_per_s": round(con["tokens_per_s"] / max(seq["tokens_per_s"], 1e-9), 2),
                    "largest_batch": h["largest_batch"],
                    "model": h["model"],
                    "bank": h["bank"],
                    "max_tokens": a.max_tokens,
                    "mode": a.mode,
                }
            ),
            flush=True,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
