"""python -m benchmarks [NAME ...] [--json] [--list] [--threads N] [--omp-passive] [--rival] | --markdown RESULTS.jsonl

Runs the named benchmarks (exact names, shell patterns like 'sample_*', or a prefix like 'prior'), or the
whole suite, in one process. Each prints one line: its figure and the ratio to its reference; with --json, one JSON
object per line on stdout ({"name", "value", "unit", "reference", "ratio", "shape", "config"}) and everything
else on stderr. A benchmark that fails is reported on stderr, the others still run, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import sys
import time
import traceback

from benchmarks import NOT_IN_SUITE, registry


def select(names: list[str], known: list[str]) -> list[str]:
    """Known names matching any of `names` (exact, pattern, or prefix), in suite order."""
    if not names:
        return [k for k in known if k not in NOT_IN_SUITE]
    chosen = set()
    for pattern in names:
        hits = [pattern] if pattern in known else [
            k for k in known if fnmatch.fnmatchcase(k, pattern) or k.startswith(pattern + "_")]
        if not hits:
            print(f"benchmarks: no benchmark matches {pattern!r}; known: {', '.join(known)}", file=sys.stderr)
            raise SystemExit(2)
        chosen.update(hits)
    return [k for k in known if k in chosen]


def markdown(path: str) -> str:
    """A --json run's lines as a Markdown table (docs/benchmarks.md)."""
    import json

    rows = ["| benchmark | value | unit | reference | ratio | target | load |", "|---|---:|---|---|---:|---|---:|"]
    for line in open(path, encoding="utf-8"):
        if not line.strip().startswith("{"):
            continue
        r = json.loads(line)
        c = r["config"]
        target = c.get("target") or ""
        if c.get("meets_target") is not None:
            target = f"{target}: **{'met' if c['meets_target'] else 'missed'}**"
        ref = f"{r['reference']:,.4g} ({c.get('reference_is', '')})" if r["reference"] is not None else "—"
        ratio = f"{r['ratio']:.3g}" if r["ratio"] is not None else "—"
        rows.append(f"| `{r['name']}` | {r['value']:,.4g} | {r['unit']} | {ref} | {ratio} | {target} | "
                    f"{c.get('loadavg_1m', '')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all); patterns and prefixes allowed")
    parser.add_argument("--json", action="store_true", help="one JSON line per benchmark on stdout")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default, every core)")
    parser.add_argument("--omp-passive", action="store_true",
                        help="set OMP_WAIT_POLICY=PASSIVE before torch loads: on a shared, oversubscribed machine "
                             "spinning OpenMP threads wait for descheduled peers (up to 10x slower small ops)")
    parser.add_argument("--rival", action="store_true",
                        help="measure DALLE-pytorch 1.6.6 just before and after each benchmark that compares with "
                             "it, at the same shape, and use that as the reference (needs `make rival-env`)")
    parser.add_argument("--markdown", metavar="JSONL", default=None,
                        help="print the results saved from a --json run as a Markdown table, and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0

    if args.omp_passive:
        if "torch" in sys.modules:
            print("benchmarks: --omp-passive has no effect: torch is already loaded", file=sys.stderr)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    benchmarks = registry()
    if args.list:
        print("\n".join(benchmarks))
        return 0
    names = select(args.names, list(benchmarks))
    bracket = None
    if args.rival:
        from benchmarks import rival

        if (why := rival.available()) is not None:
            print(f"benchmarks: --rival: {why}", file=sys.stderr)
            return 2
        bracket = rival.Bracket()
    import torch

    from dallecli.allocator import keep_freed_memory

    keep_freed_memory()  # as every `dalle` command starts

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"benchmarks: {len(names)} to run, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", file=sys.stderr)
    results, failed = {}, []
    for name in names:
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # library summaries must not mix with the results
                result = bracket.run(name, benchmarks[name]) if bracket else benchmarks[name]()
        except Exception as exc:  # noqa: BLE001  (one broken benchmark must not stop the suite)
            failed.append(name)
            print(f"{name}: FAILED ({type(exc).__name__}: {exc})", file=sys.stderr)
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
            continue
        if name.startswith("sample_cached_"):
            uncached = results.get(name.replace("cached", "uncached", 1))
            if uncached is not None:
                result.config["speedup_vs_uncached"] = result.value / uncached.value
        result.config["wall_s"] = round(time.perf_counter() - t0, 1)
        results[name] = result
        print(result.to_json() if args.json else result.line(), flush=True)
    print(f"benchmarks: {len(results)} done, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''} "
          f"in {time.perf_counter() - start:.0f} s; load average now {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
