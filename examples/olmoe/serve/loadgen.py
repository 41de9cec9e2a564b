#!/usr/bin/env python3
"""Load generator for `olmoe serve` (Python standard library only).

N concurrent clients send streamed /v1/completions requests for a fixed
time, each request with a k drawn from a mix (or none: the server's policy
decides), and report: throughput (generated tokens/s), time to first token
and per-token latency (p50, p99), experts per token, and the count of each
answer (200, 503, other). A 503 is answered cleanly when it carries
Retry-After; the client then waits 50 ms and tries again. Clients stop
starting requests at the end of --duration and finish the ones in flight.

  loadgen.py --port 8080 --clients 8 --duration 60 --mix 8:1,2:1 --max-tokens 32
  --mix policy   sends no k (the server's --policy decides)
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time

import serve_http


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def parse_mix(s):
    if s == "policy":
        return [(None, 1.0)]
    out = []
    for part in s.split(","):
        k, _, w = part.partition(":")
        out.append((int(k), float(w or 1)))
    return out


def client(i, a, mix, stop_at, res, lock):
    rng = random.Random(a.seed * 1000 + i)
    while time.time() < stop_at:
        r = rng.random() * sum(w for _, w in mix)
        k = mix[-1][0]
        for kk, w in mix:
            if r < w:
                k = kk
                break
            r -= w
        prompt = [rng.randrange(2, a.vocab) for _ in range(a.prompt_len)]
        body = {"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0, "stream": True,
                "return_token_ids": True}
        if k is not None:
            body["k"] = k
        t0 = time.time()
        try:
            c = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout)
            resp = serve_http.send(c, "POST", "/v1/completions", body)
            if resp.status != 200:
                resp.read()
                c.close()
                with lock:
                    key = "503" if resp.status == 503 and resp.getheader("Retry-After") else str(resp.status)
                    res["codes"][key] = res["codes"].get(key, 0) + 1
                time.sleep(0.05)
                continue
            first, last, n, ept, done = None, None, 0, None, False
            gaps = []
            for j in serve_http.chunks(resp):
                if j is None:
                    done = True
                    break
                if "error" in j:
                    break
                now = time.time()
                for ch in j.get("choices", []):
                    m = len(ch.get("token_ids", []))
                    if m:
                        if first is None:
                            first = now
                        elif last is not None:
                            gaps += [(now - last) / m] * m
                        last = now
                        n += m
                if "usage" in j:
                    ept = j["usage"].get("experts_per_token")
            c.close()
            with lock:
                if done and first is not None:
                    res["codes"]["200"] = res["codes"].get("200", 0) + 1
                    res["ttft"].append(first - t0)
                    res["tpot"] += gaps
                    res["tokens"] += n
                    res["ept"].append(ept)
                    res["by_k"].setdefault(str(k if k is not None else "policy"), []).append(ept)
                else:
                    res["codes"]["other"] = res["codes"].get("other", 0) + 1
        except (OSError, http.client.HTTPException, ValueError) as e:
            with lock:
                res["codes"]["other"] = res["codes"].get("other", 0) + 1
                res["errors"].append(repr(e))
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--mix", default="policy", help="k:weight,... or 'policy'")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=256, help="prompt token ids are drawn from [2, vocab)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    mix = parse_mix(a.mix)
    res = {"codes": {}, "ttft": [], "tpot": [], "tokens": 0, "ept": [], "by_k": {}, "errors": []}
    lock = threading.Lock()
    t0 = time.time()
    stop_at = t0 + a.duration
    ts = [threading.Thread(target=client, args=(i, a, mix, stop_at, res, lock), daemon=True) for i in range(a.clients)]
    [t.start() for t in ts]
    [t.join(a.duration + a.timeout) for t in ts]
    wall = time.time() - t0
    out = {
        "mix": a.mix, "clients": a.clients, "duration_s": round(wall, 2), "max_tokens": a.max_tokens,
        "prompt_len": a.prompt_len, "codes": res["codes"], "tokens": res["tokens"],
        "throughput_tok_s": round(res["tokens"] / wall, 2),
        "ttft_ms": {"p50": round(pct(res["ttft"], 50) * 1e3, 1), "p99": round(pct(res["ttft"], 99) * 1e3, 1)},
        "per_token_ms": {"p50": round(pct(res["tpot"], 50) * 1e3, 1), "p99": round(pct(res["tpot"], 99) * 1e3, 1)},
        "experts_per_token": {k: round(statistics.mean(v), 2) for k, v in res["by_k"].items() if v and None not in v},
        "errors": res["errors"][:5],
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"mix {a.mix}: {a.clients} clients, {wall:.1f} s, answers {res['codes']}")
        print(f"  throughput {out['throughput_tok_s']} tok/s ({res['tokens']} tokens)")
        print(f"  TTFT p50 {out['ttft_ms']['p50']} ms, p99 {out['ttft_ms']['p99']} ms; "
              f"per-token p50 {out['per_token_ms']['p50']} ms, p99 {out['per_token_ms']['p99']} ms")
        print(f"  experts per token by k: {out['experts_per_token']}")
        if res["errors"]:
            print("  errors:", res["errors"][:5])
    lost = res["codes"].get("other", 0)
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
