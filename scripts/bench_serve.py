"""What `qvl serve` costs over calling the model in Python: the same greedy answers, timed both ways
in one run, on the same loaded model.

    python scripts/bench_serve.py MODEL.gguf [--tokens 64] [--runs 5]

Prints, per way, the median wall time of a request (a new prompt each time, so both ways reuse
only the chat template's shared start from the KV cache) and the tokens a second that gives,
then the server's time over the direct call's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request

from qvl.runtime.model import load
from qvl.runtime.server import ServeConfig, Service, serve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = load(args.model)
    service = Service(ServeConfig(default_model=args.model), loader=lambda *a, **k: model)
    started = threading.Event()
    box = {}

    def ready(server):
        box["port"] = server.server_address[1]
        started.set()

    threading.Thread(target=serve, args=(service, "127.0.0.1", 0, lambda line: None, ready), daemon=True).start()
    started.wait()
    url = f"http://127.0.0.1:{box['port']}/api/generate"
    prompts = [f"Count from {i} upwards." for i in range(args.runs + 1)]  # a new prompt each time

    def direct(prompt: str) -> int:
        return len(model.generate(prompt, max_new_tokens=args.tokens).token_ids)

    def served(prompt: str) -> int:
        body = json.dumps({"prompt": prompt, "options": {"num_predict": args.tokens}}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=body)) as r:
            events = [json.loads(line) for line in r.read().decode().splitlines()]
        return events[-1]["eval_count"]

    ways = {"direct": direct, "served": served}
    times: dict[str, list[float]] = {name: [] for name in ways}
    counts: dict[str, list[int]] = {name: [] for name in ways}
    for way in ways.values():
        way(prompts[-1])  # warm-up
    for i, p in enumerate(prompts[:-1]):  # the two ways alternate, so that a busy machine slows both
        for name in (("direct", "served") if i % 2 == 0 else ("served", "direct")):
            t0 = time.perf_counter()
            counts[name].append(ways[name](p))
            times[name].append(time.perf_counter() - t0)
    results = {name: statistics.median(t) for name, t in times.items()}
    for name, t in results.items():
        n = statistics.median(counts[name])
        print(f"{name:>7}: {t * 1e3:8.1f} ms a request, {n} tokens, {n / t:7.1f} tok/s")
    print(f"served / direct: {results['served'] / results['direct']:.3f}x the time")


if __name__ == "__main__":
    main()
