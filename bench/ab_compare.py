"""Same-run A/B comparison of two turboquant_bench binaries (e.g. main vs a branch).

Runs both binaries alternately `--rounds` times on the same google-benchmark filter and
prints the minimum CPU and wall time of each benchmark with the before/after ratio; the
minimum over interleaved rounds is the most robust statistic on a machine shared with other
jobs. Benchmarks with different user counters must go in separate calls (google-benchmark's
CSV output drops rows whose counters differ from the first one's).

  python bench/ab_compare.py --before /tmp/main_bench --after build/bench/turboquant_bench \\
      --filter 'AttendWindow/' --rounds 7
"""
import argparse
import csv
import io
import subprocess


def run(binary, filt, min_time):
    out = subprocess.run([binary, f"--benchmark_filter={filt}", f"--benchmark_min_time={min_time}",
                          "--benchmark_format=csv"], capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("name,") or line.startswith('"')]
    return {r["name"]: (float(r["cpu_time"]), float(r["real_time"]), r["time_unit"])
            for r in csv.DictReader(io.StringIO("\n".join(rows)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--filter", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.05)
    a = ap.parse_args()
    res = {}
    for _ in range(a.rounds):
        for side, binary in (("before", a.before), ("after", a.after)):
            for name, v in run(binary, a.filter, a.min_time).items():
                res.setdefault(name, {}).setdefault(side, []).append(v)
    print(f"{'benchmark':50s} {'cpu before':>10s} {'cpu after':>10s} {'ratio':>6s} | "
          f"{'wall before':>11s} {'wall after':>10s} {'ratio':>6s}  (min of {a.rounds}, unit)")
    for name, v in res.items():
        if "before" not in v or "after" not in v:
            print(f"{name:50s} only in {list(v)}")
            continue
        cb, ca = min(x[0] for x in v["before"]), min(x[0] for x in v["after"])
        wb, wa = min(x[1] for x in v["before"]), min(x[1] for x in v["after"])
        print(f"{name:50s} {cb:10.1f} {ca:10.1f} {cb / ca:6.2f} | {wb:11.1f} {wa:10.1f} {wb / wa:6.2f}  "
              f"{v['after'][0][2]}")


if __name__ == "__main__":
    main()
