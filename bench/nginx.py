"""nginx as the reference reverse proxy of the bench suite: its config, start and stop.

nginx does what zaiproxy does on the wire for the suite's requests and nothing more: it maps
the proxy's public path ``/v1/chat/completions`` to the mock's ``/api/paas/v4/chat/completions``,
sets ``Authorization: Bearer <upstream key>`` whatever the client sent, streams responses
through unbuffered (``proxy_buffering off``) and keeps upstream connections alive
(``keepalive 64`` per worker, HTTP/1.1, an empty ``Connection`` header). It runs in the
foreground (``daemon off``) with a master and ``workers`` worker processes, from its own
config under the run folder, with its own pid file, error log and temp paths there; the access
log is off (zaiproxy writes one, so this favours nginx a little).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from bench.procs import BenchError, Child

CONFIG = """\
# Written by bench/nginx.py for one bench run.
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {root}/nginx.pid;
error_log {root}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {root}/client_body_temp;
    proxy_temp_path {root}/proxy_temp;
    fastcgi_temp_path {root}/fastcgi_temp;
    uwsgi_temp_path {root}/uwsgi_temp;
    scgi_temp_path {root}/scgi_temp;
    # zaiproxy's max_body_bytes; bodies up to 1 MiB stay in memory, as they do in zaiproxy.
    client_max_body_size 32m;
    client_body_buffer_size 1m;
    # Never close a client or upstream connection because of a request count (zaiproxy does not).
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    upstream mock {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port};

        location = /v1/chat/completions {{
            proxy_pass http://mock/api/paas/v4/chat/completions;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {api_key}";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}

        location / {{
            return 404;
        }}
    }}
}}
"""


def binary() -> str:
    """The nginx executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BenchError("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


def write_config(root: Path, port: int, upstream_port: int, api_key: str, workers: int) -> Path:
    """Write ``root/nginx.conf`` (creating ``root``) and return its path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "nginx.conf"
    path.write_text(CONFIG.format(root=root.resolve(), port=port, upstream_port=upstream_port,
                                  api_key=api_key, workers=workers))
    return path


def error_log_tail(root: Path, lines: int = 20) -> str:
    path = root / "error.log"
    if not path.exists():
        return "(no error log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"


def start(root: Path, port: int, upstream_port: int, api_key: str, workers: int) -> Child:
    """Check the config with ``nginx -t``, then start nginx in the foreground as a Child.

    Its readiness is not announced: the caller polls the port. ``-e`` sends the errors nginx
    logs before reading its config to the run folder too, not to /var/log/nginx.
    """
    conf = write_config(root, port, upstream_port, api_key, workers)
    root = root.resolve()
    cmd = [binary(), "-p", f"{root}/", "-c", str(conf.resolve()), "-e", f"{root}/error.log"]
    test = subprocess.run([*cmd, "-t", "-q"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise BenchError(f"nginx -t rejected {conf}:\n{test.stdout}{test.stderr}"
                         f"{error_log_tail(root)}")
    return Child("nginx", cmd, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, root)


def stop(child: Child) -> int | None:
    """Graceful shutdown (SIGQUIT), then fast shutdown (SIGTERM), then SIGKILL."""
    return child.stop((signal.SIGQUIT, signal.SIGTERM))
