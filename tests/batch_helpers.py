"""Stand-ins for ``vitconv.conversion.batch.run_row`` that worker processes import by name (spawned
workers unpickle a task by its module and name), and a range-capable HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import re
import signal
import threading
import time
from pathlib import Path

from vitconv.conversion.batch import run_row
from vitconv.formats.atomic import atomic_output


def dies_on_marked_rows(row, force=False, previous=None, command="vitconv batch"):
    """A row whose ``dst`` names ``dies`` kills its worker every time; ``dies-once`` only the
    first time (a marker file beside the output remembers)."""
    name = Path(row.dst).name
    if "dies-once" in name:
        marker = Path(row.dst).with_name(name + ".died")
        if not marker.exists():
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
    elif "dies" in name:
        os.kill(os.getpid(), signal.SIGKILL)
    return run_row(row, force, previous, command)


def slow_writer(row, force=False, previous=None, command="vitconv batch"):
    """A row named ``slow`` holds a half-written temporary beside its output for 60 s."""
    if "slow" in Path(row.dst).name:
        with atomic_output(row.dst) as tmp:
            tmp.write_bytes(b"partial")
            time.sleep(60)
    return run_row(row, force, previous, command)


class RangeServer:
    """``http.server`` over a directory with HEAD (size and an ETag), ``Range: bytes=a-b``
    (206) and a log of what each GET sent, on 127.0.0.1 only."""

    def __init__(self, root: Path):
        self.root, self.sent = Path(root), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _file(self):
                p = (outer.root / self.path.lstrip("/")).resolve()
                return p if p.is_file() and p.is_relative_to(outer.root.resolve()) else None

            def do_HEAD(self):
                p = self._file()
                if p is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                st = p.stat()
                self.send_header("Content-Length", str(st.st_size))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')  # as nginx makes one
                self.end_headers()

            def do_GET(self):
                p = self._file()
                if p is None:
                    self.send_error(404)
                    return
                data, size = p.read_bytes(), p.stat().st_size
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if m:
                    a, b = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                    body = data[a:b + 1]
                else:
                    self.send_response(200)
                    body = data
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self.wfile.write(body)
                outer.sent.append((self.path, self.headers.get("Range"), len(body)))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "RangeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def with_timm(row, force=False, previous=None, command="vitconv batch"):
    """:func:`run_row` in a worker where timm imports (this machine has no CPU torchvision:
    tests/timm_import.py answers for it, as in the test process itself)."""
    from timm_import import import_timm

    import_timm()
    return run_row(row, force, previous, command)
