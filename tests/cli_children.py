"""Real child processes running the ``vitconv`` CLI: the exit status, stdout and stderr a user
sees, with resource limits a test can impose (file size, address space, wall time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: Runs many CLI invocations as real child processes while paying torch's import once: the
#: driver imports the CLI, then forks one child per job; each child runs the console entry
#: point in standalone mode with fds 1 and 2 on files, so exit status and stderr bytes are
#: exactly what the process produced.
FORK_DRIVER = r"""
import json, os, resource, signal, sys
from _vitconv_cli.main import main
import torch, vitconv.model, vitconv.conversion.pipeline  # imported once here, not in every child
jobs = json.loads(sys.argv[1])
out = []
for i, job in enumerate(jobs):
    paths = [job["log"] + ".out", job["log"] + ".err"]
    pid = os.fork()
    if pid == 0:
        for fd, p in zip((1, 2), paths):
            os.dup2(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        if job.get("memory"):  # address space: a read that would allocate GiBs fails instead
            resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
        if job.get("timeout"):  # a hang (a FIFO opened, a forged loop) dies by SIGALRM
            signal.alarm(job["timeout"])
        if job.get("fsize"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # see EFBIG instead of dying
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        code = 70
        try:
            main(job["args"], prog_name="vitconv")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what the interpreter does with an uncaught exception
            import traceback
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.append([os.waitstatus_to_exitcode(status)] + [open(p).read() for p in paths])
print(json.dumps(out))
"""


def fork_run(jobs: list, logdir: Path) -> list:
    """``[exit status, stdout, stderr]`` per job: ``{"args": [...]}`` plus optional ``fsize``,
    ``memory`` (bytes of address space) and ``timeout`` (seconds; SIGALRM kills: status -14)."""
    for i, j in enumerate(jobs):
        j["args"] = [str(a) for a in j["args"]]
        j["log"] = str(logdir / f"job{i}")
    r = subprocess.run([sys.executable, "-c", FORK_DRIVER, json.dumps(jobs)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
