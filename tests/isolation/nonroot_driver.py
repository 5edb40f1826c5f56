"""Plays a NON-root poolmgr (run by test_nonroot.py as an unprivileged user): prepare + wrap + spawn.

argv: [workdir root, pool id, engine user to ask for, probe code file, port of a TCP listener]
Prints one JSON object: the layer decisions, /proc status of a sandboxed `sleep`, and the probe's results.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from poolmgr.isolation import build_isolation, prepare, release, wrap_command

root, pool_id, user, probe_file, target = sys.argv[1:6]
spec = build_isolation({}, engine_user=user, workdir_root=Path(root), pool_id=pool_id, readable_paths=())
prepared = prepare(spec)
argv, env = wrap_command(prepared, ["sleep", "30"], {})
argv0 = argv[0]
proc = subprocess.Popen(argv, env=env, start_new_session=True, stdin=subprocess.DEVNULL, close_fds=True)
deadline = time.monotonic() + 5
while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
    time.sleep(0.005)
status_text = Path(f"/proc/{proc.pid}/status").read_text()
status = {k: v.strip() for k, _, v in (line.partition(":") for line in status_text.splitlines())}
cwd = str(Path(f"/proc/{proc.pid}/cwd").readlink())
proc.kill()
proc.wait()
code = Path(probe_file).read_text()
argv, env = wrap_command(prepared, [sys.executable, "-c", code, target], {})
probe = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=True)
release(prepared)
print(
    json.dumps(
        {
            "layers": {d.name: [d.in_force, d.detail] for d in prepared.layers},
            "spawner": prepared.spawner_kind,
            "argv0": argv0,
            "status": status,
            "cwd": cwd,
            "probe": json.loads(probe.stdout),
        }
    )
)
