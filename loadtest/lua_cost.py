#!/usr/bin/env python3
"""What a call from a Redis Function costs next to the command itself (BENCHMARKS.md,
"What bounds each figure"). Needs the `redis` Python package and `redis-server` on PATH.

    python3 loadtest/lua_cost.py [--calls 20000] [--rounds 5]

Starts a private redis-server (no persistence) on a free port, loads a small library and
times, with INFO commandstats (the server's own time per call, no network):
  - an empty function with 1 key + 1 argument, and with 9 keys + 77 arguments (the size
    of a process's create commit): the cost of each value passed in;
  - a function making 10 HSETs, and one making 10 HGETs, against the same commands sent
    directly: the cost of a call made from Lua.
Each figure is the minimum over the rounds (the host's other load only adds time).
"""

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis

LIBRARY = """#!lua name=lua_cost
redis.register_function('empty', function(KEYS, ARGV) return 1 end)
redis.register_function('hset10', function(KEYS, ARGV)
  for i = 1, 10 do redis.call('HSET', KEYS[1], 'f' .. i, ARGV[1]) end
  return 1
end)
redis.register_function('hget10', function(KEYS, ARGV)
  for i = 1, 10 do redis.call('HGET', KEYS[1], 'f' .. i) end
  return 1
end)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, workdir):
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    r = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            r.ping()
            return proc, r
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("lua_cost.py: redis-server did not start")
            time.sleep(0.05)


def usec_per_call(r, name):
    return r.info("commandstats").get(name, {}).get("usec_per_call", 0.0)


def fcall(r, fn, nkeys, nargs, calls):
    keys = [f"lc{{0}}:{i}" for i in range(nkeys)]
    args = ["x" * 40 for _ in range(nargs)]
    r.config_resetstat()
    p = r.pipeline(transaction=False)
    for _ in range(calls):
        p.fcall(fn, nkeys, *keys, *args)
    p.execute()
    return usec_per_call(r, "cmdstat_fcall")


def direct(r, cmd, calls):
    r.config_resetstat()
    p = r.pipeline(transaction=False)
    for i in range(calls):
        field = f"f{i % 10 + 1}"
        if cmd == "hset":
            p.hset("lc{0}:0", field, "x" * 40)
        else:
            p.hget("lc{0}:0", field)
    p.execute()
    return usec_per_call(r, "cmdstat_" + cmd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("lua_cost.py: redis-server is not on PATH")
    workdir = tempfile.mkdtemp(prefix="lua-cost-")
    proc, r = start_server(free_port(), workdir)
    try:
        version = r.info("server")["redis_version"]
        r.function_load(LIBRARY, replace=True)
        runs = {
            "empty, 1 key + 1 argument": lambda: fcall(r, "empty", 1, 1, a.calls),
            "empty, 9 keys + 77 arguments": lambda: fcall(r, "empty", 9, 77, a.calls),
            "10 HSETs from Lua": lambda: fcall(r, "hset10", 1, 1, a.calls),
            "10 HGETs from Lua": lambda: fcall(r, "hget10", 1, 1, a.calls),
            "HSET sent directly": lambda: direct(r, "hset", a.calls),
            "HGET sent directly": lambda: direct(r, "hget", a.calls),
        }
        best = {}
        for _ in range(a.rounds):
            for name, run in runs.items():
                v = run()
                best[name] = min(best.get(name, v), v)
        print(f"Redis {version}, {os.cpu_count()} CPUs; µs per call (server time, minimum of "
              f"{a.rounds} rounds of {a.calls} calls):")
        for name, v in best.items():
            print(f"  {name:30s} {v:7.2f}")
        empty = best["empty, 1 key + 1 argument"]
        per_value = (best["empty, 9 keys + 77 arguments"] - empty) / 84
        print(f"  each value passed into a function: {per_value:.3f} µs")
        for cmd in ("HSET", "HGET"):
            from_lua = (best[f"10 {cmd}s from Lua"] - empty) / 10
            sent = best[f"{cmd} sent directly"]
            print(f"  {cmd} from Lua {from_lua:.2f} µs, its own execution {sent:.2f} µs: "
                  f"{from_lua - sent:.2f} µs per call for the call itself")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
