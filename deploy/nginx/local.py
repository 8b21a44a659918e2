"""Run the nginx example on this machine, without root: the template filled
in, a main nginx.conf around it, every path under one directory.

    python deploy/nginx/local.py --dir /tmp/tg-nginx --port 8088 \\
        --app 127.0.0.1:8000 --authz 127.0.0.1:8081 --serve 127.0.0.1:8080

The test suite and bench/run.py start the example this way.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "tutorgate.conf.template"
NGINX = "/usr/sbin/nginx"

MAIN = """worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/{site};
}}
"""


def render(app: str, authz: str, serve: str, port: int, template: Path = TEMPLATE) -> str:
    """The template with its ${VARS} filled in (what envsubst does)."""
    text = template.read_text(encoding="utf-8")
    for name, value in (("TUTORGATE_APP", app), ("TUTORGATE_AUTHZ", authz),
                        ("TUTORGATE_SERVE", serve), ("NGINX_PORT", str(port))):
        text = text.replace("${" + name + "}", value)
    return text


def write(directory: Path, site: str, workers: int = 1, name: str = "tutorgate.conf") -> Path:
    """nginx.conf and the site file in `directory`; returns nginx.conf."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(site, encoding="utf-8")
    conf = directory / "nginx.conf"
    conf.write_text(MAIN.format(workers=workers, dir=directory, site=name), encoding="utf-8")
    return conf


def start(directory: Path, conf: Path, port: int, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """nginx in the foreground (daemon off), once it accepts connections."""
    import socket

    proc = subprocess.Popen([NGINX, "-p", str(directory), "-e", str(directory / "error.log"),
                             "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.communicate()[1].decode(errors="replace")
                log = directory / "error.log"
                raise RuntimeError("nginx did not start: " + err +
                                   (log.read_text() if log.exists() else "")) from None
            time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--app", required=True)
    p.add_argument("--authz", required=True)
    p.add_argument("--serve", required=True)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    d = a.dir.resolve()
    conf = write(d, render(a.app, a.authz, a.serve, a.port), a.workers)
    proc = start(d, conf, a.port)
    print(f"nginx on http://127.0.0.1:{a.port} (config {conf})", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
