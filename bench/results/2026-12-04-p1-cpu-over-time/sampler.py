"""Every PERIOD s: CPU% per process (grouped by a short name) over the last period, as JSON lines."""
import os, sys, time, json
PERIOD = float(sys.argv[1]); OUT = sys.argv[2]
hz = os.sysconf("SC_CLK_TCK")
def name(pid):
    c = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    if c.startswith("ray::"): return c.split()[0]
    for k in ("gcs_server", "raylet", "dashboard/agent", "runtime_env", "log_monitor", "dashboard/dashboard", "bench.bare", "search.run", "bench.run", "monitor.py"):
        if k in c: return k
    if "ray-dashboard" in c: return c.split()[0]
    return c[:40]
def snap():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            out[pid] = (name(pid), (int(f[11]) + int(f[12])) / hz)
        except Exception: pass
    return out
a = snap()
with open(OUT, "a") as fh:
    while True:
        time.sleep(PERIOD); b = snap(); agg = {}
        for pid, (n, t) in b.items():
            d = t - a[pid][1] if pid in a else t
            if d > 0: agg[n] = agg.get(n, 0) + d
        a = b
        fh.write(json.dumps({"t": time.strftime("%H:%M:%S"), "cpu_pct": {k: round(v / PERIOD * 100, 1) for k, v in sorted(agg.items(), key=lambda x: -x[1])[:25]}}) + "\n"); fh.flush()
