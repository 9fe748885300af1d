"""Every PERIOD s, one JSON line: CPU% and thread count per process (pid and short name), the system's context
switches and interrupts per second, and for the busiest process its busiest threads' CPU% with their voluntary and
involuntary context switches per second.

python sampler2.py PERIOD OUT.jsonl"""
import json, os, sys, time

PERIOD, OUT = float(sys.argv[1]), sys.argv[2]
HZ = os.sysconf("SC_CLK_TCK")


def name(pid):
    c = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    if c.startswith("ray::"):
        return c.split()[0]
    for k in ("gcs_server", "raylet", "dashboard/agent", "runtime_env", "log_monitor", "dashboard/dashboard",
              "bench.bare", "search.run", "bench.run", "monitor.py"):
        if k in c:
            return k
    return c[:40] or open(f"/proc/{pid}/comm").read().strip()


def cpu(path):
    f = open(path).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ, int(f[17])  # utime+stime seconds, num_threads


def ctx(path):
    v = n = 0
    for line in open(path):
        if line.startswith("voluntary_ctxt_switches"):
            v = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches"):
            n = int(line.split()[1])
    return v, n


def system():
    out = {}
    for line in open("/proc/stat"):
        k = line.split()
        if k[0] in ("ctxt", "intr"):
            out[k[0]] = int(k[1])
    return out


def snap():
    procs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                t, n = cpu(f"/proc/{pid}/stat")
                procs[pid] = (name(pid), t, n)
            except Exception:
                pass
    return procs, system(), time.time()


def threads(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            t, _ = cpu(f"/proc/{pid}/task/{tid}/stat")
            comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            out[tid] = (comm, t, *ctx(f"/proc/{pid}/task/{tid}/status"))
        except Exception:
            pass
    return out


a, sa, ta = snap()
top, th_a = None, {}
with open(OUT, "a") as fh:
    while True:
        time.sleep(PERIOD)
        b, sb, tb = snap()
        dt = tb - ta
        rows = []
        for pid, (n, t, nt) in b.items():
            d = t - a[pid][1] if pid in a else t
            if d > 0:
                rows.append((round(d / dt * 100, 1), pid, n, nt))
        rows.sort(reverse=True)
        line = {"t": time.strftime("%H:%M:%S"), "ctxt_per_s": round((sb["ctxt"] - sa["ctxt"]) / dt),
                "intr_per_s": round((sb["intr"] - sa["intr"]) / dt), "procs": rows[:30],
                "n_procs": {}}
        for n, _, _ in b.values():
            line["n_procs"][n] = line["n_procs"].get(n, 0) + 1
        line["n_procs"] = {k: v for k, v in line["n_procs"].items() if k.startswith("ray::") or "ray" in k}
        if rows and rows[0][0] > 50:
            pid = rows[0][1]
            th_b = threads(pid)
            if pid == top:
                tr = []
                for tid, (comm, t, v, nv) in th_b.items():
                    if tid in th_a:
                        _, t0, v0, nv0 = th_a[tid]
                        tr.append((round((t - t0) / dt * 100, 1), tid, comm, round((v - v0) / dt), round((nv - nv0) / dt)))
                tr.sort(reverse=True)
                line["top_threads"] = {"pid": pid, "n": len(th_b), "rows": tr[:8]}
            top, th_a = pid, th_b
        a, sa, ta = b, sb, tb
        fh.write(json.dumps(line) + "\n")
        fh.flush()
