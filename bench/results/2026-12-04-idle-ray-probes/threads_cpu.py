import os, sys, time, collections
def snap():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            cmd = open(f"/proc/{pid}/cmdline","rb").read().replace(b"\0",b" ").decode()[:80]
            for tid in os.listdir(f"/proc/{pid}/task"):
                st = open(f"/proc/{pid}/task/{tid}/stat").read()
                name = st[st.index("(")+1:st.rindex(")")]
                f = st[st.rindex(")")+2:].split()
                out[(pid, tid)] = (cmd, name, int(f[11]) + int(f[12]))
        except Exception: pass
    return out
a = snap(); T = float(sys.argv[1]); time.sleep(T); b = snap()
hz = os.sysconf("SC_CLK_TCK")
per_thread = collections.Counter(); per_proc = collections.Counter(); names = {}
for k, (cmd, name, t) in b.items():
    if k in a:
        d = (t - a[k][2]) / hz / T * 100
        if d > 0:
            per_thread[(k[0], name, cmd[:50])] += d; per_proc[(k[0], cmd[:70])] += d
print("total %.1f%%" % sum(per_proc.values()))
for (p, c), v in per_proc.most_common(25): print("%6.2f%% %s %s" % (v, p, c))
print("--- threads")
for (p, n, c), v in per_thread.most_common(40): print("%6.2f%% %s %-18s %s" % (v, p, n, c))
