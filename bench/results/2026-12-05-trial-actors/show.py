import json, sys
s = json.load(open(sys.argv[1]))
workers = {w['worker_id']: w for w in s['workers']}
rows = []
for t in s['tasks']:
    ev = t['events'] if isinstance(t['events'], list) else []
    rows.append((float(t['creation_time_ms']), t, ev))
rows.sort(key=lambda r: r[0])
t0 = rows[0][0]
for c, t, ev in rows:
    if 'poll_status' in t['name'] or 'get_auto' in t['name']: continue
    if t['type'] not in ('ACTOR_CREATION_TASK', 'NORMAL_TASK') and not any(k in t['name'] for k in ('fit', 'run', 'train', 'start', 'init', 'poll', 'shutdown')):
        continue
    w = workers.get(t['worker_id'], {})
    launch = w.get('worker_launch_time_ms'); launched = w.get('worker_launched_time_ms')
    evs = " ".join(f"{e['state'][:12]}+{(e['created_ms']-c)/1000:.2f}" for e in ev)
    wl = ""
    if launch and int(launch) < 1e15:
        wl = f" | proc launch {(int(launch)-t0)/1000:.2f} launched {(int(launched)-t0)/1000:.2f} start {(int(w['start_time_ms'])-t0)/1000:.2f}"
    print(f"{(c-t0)/1000:7.2f} {t['type'][:6]} {t['name'][:55]:55s} pid {str(t['worker_pid']):>6} {evs}{wl}")
