"""What `qvl serve` costs over calling the model in Python: the same greedy answers, timed both ways
in one run, on the same loaded model, the model always called from the main thread (as `qvl serve`
does; the client is another process).

    python scripts/bench_serve.py MODEL.gguf [--tokens 64] [--runs 5]

Prints the median wall time of a request (a new prompt each time, so that both ways reuse only
the chat template's shared start from the KV cache) and the tokens a second that gives: called
directly before the server starts, through /api/generate (streamed JSON lines), and directly
again after it stops; then the server's time over the direct calls'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

from qvl.runtime.loader import load
from qvl.runtime.http_serve import serve
from qvl.runtime.server import ServeConfig, Service


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = load(args.model)
    prompts = [f"Count from {i} upwards." for i in range(args.runs)]
    times: dict[str, list[float]] = {"direct, before": [], "served": [], "direct, after": []}
    counts: dict[str, list[int]] = {k: [] for k in times}

    def timed(way: str, call) -> None:
        for p in prompts:
            t0 = time.perf_counter()
            counts[way].append(call(p))
            times[way].append(time.perf_counter() - t0)

    def direct(prompt: str) -> int:
        return len(model.generate(prompt, max_new_tokens=args.tokens).token_ids)

    model.generate("warm-up", max_new_tokens=args.tokens)
    timed("direct, before", direct)

    def client(server) -> None:
        """Requests from another process, as a real client sends them (no GIL shared with the server)."""
        url = f"http://127.0.0.1:{server.server_address[1]}/api/generate"
        code = ("import json, sys, time, urllib.request\n"
                "url, n, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])\n"
                "for p in ['warm-up'] + prompts:\n"
                "    body = json.dumps({'prompt': p, 'options': {'num_predict': n}}).encode()\n"
                "    t0 = time.perf_counter()\n"
                "    with urllib.request.urlopen(urllib.request.Request(url, data=body)) as r:\n"
                "        last = json.loads(r.read().decode().splitlines()[-1])\n"
                "    print(json.dumps([time.perf_counter() - t0, last['eval_count']]))\n")
        out = subprocess.run([sys.executable, "-c", code, url, str(args.tokens), json.dumps(prompts)],
                             capture_output=True, text=True, check=True).stdout.splitlines()[1:]
        for line in out:
            t, n = json.loads(line)
            times["served"].append(t)
            counts["served"].append(n)
        server.shutdown()

    service = Service(ServeConfig(default_model=args.model), loader=lambda *a, **k: model)
    serve(service, "127.0.0.1", 0, lambda line: None,
          lambda server: threading.Thread(target=client, args=(server,), daemon=True).start())
    timed("direct, after", direct)
    results = {way: statistics.median(t) for way, t in times.items()}
    for way, t in results.items():
        n = statistics.median(counts[way])
        print(f"{way:>14}: {t * 1e3:8.1f} ms a request, {n:.0f} tokens, {n / t:7.1f} tok/s")
    direct_s = (results["direct, before"] + results["direct, after"]) / 2
    print(f"served / direct: {results['served'] / direct_s:.3f}x the time")


if __name__ == "__main__":
    main()
