#!/usr/bin/env python3
"""
Run sentry_tx as the image would, without a Docker engine:

  - a fresh venv, installed as conf/Dockerfile does (pip install -c
    conf/constraints.txt ., byte code compiled, Twisted's plugin cache
    written), owned by root: read-only to the service's user;
  - /sentry (conf/sentry) started as uid/gid 65532 with HOME=/nonexistent,
    cwd /, PATH on the venv, and a credentials directory it owns (the only
    writable place, as under readOnlyRootFilesystem);
  - it runs two serving processes (--workers 2: the twistd process and one
    copy, `python -m sentry_tx serve`), whose metrics files and liveness
    socket live in a private directory under /dev/shm (no TMPDIR is set, as
    in Dapr's chart): while it runs, the only things uid 65532 owns outside
    the credentials directory are one /dev/shm/sentry-tx-* directory of
    mode 0700 and what is in it;
  - it must reach healthz 200, pass the image's HEALTHCHECK command, stop
    on SIGTERM, and have written nothing but the bundle: the venv is
    byte-for-byte unchanged and, once stopped, no file owned by uid 65532
    exists outside the credentials directory (in /tmp, /var/tmp, /dev/shm
    either: the private directory is removed at stop).

Needs root (to switch user), the package index pip is configured with, and
a Python 3.11 the service's user can execute (the image's is in /usr/local;
here BASE_PYTHON, default /usr/bin/python3: a venv's interpreter must not
live where uid 65532 cannot reach, such as /root/.pyenv).
Usage: sudo conf/check-image-run.py   (prints what it checked; exit 0 = ok)
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

UID = GID = 65532
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 15


def tree_state(root):
    """
    Every path under C{root} with its size and mtime.
    """
    state = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            state[path] = (st.st_size, st.st_mtime_ns)
    return state


def owned_by(uid, roots, exclude):
    found = []
    for root in roots:
        for directory, names, files in os.walk(root):
            for name in names + files:
                path = os.path.join(directory, name)
                if path == exclude or path.startswith(exclude + os.sep):
                    continue
                try:
                    if os.lstat(path).st_uid == uid:
                        found.append(path)
                except OSError:
                    pass
    return found


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main():
    if os.geteuid() != 0:
        sys.exit("run as root: the service is started as uid 65532")
    # As in an image build: files readable and executable by everyone.
    os.umask(0o022)
    work = tempfile.mkdtemp(prefix="sentry-image-")
    os.chmod(work, 0o755)
    try:
        venv = os.path.join(work, "opt", "sentry-tx")
        print(f"venv {venv}: installing as conf/Dockerfile does")
        base_python = os.environ.get("BASE_PYTHON", "/usr/bin/python3")
        subprocess.run([base_python, "-m", "venv", venv], check=True)
        subprocess.run(
            [os.path.join(venv, "bin", "pip"), "install", "--quiet",
             "-c", os.path.join(TOP, "conf", "constraints.txt"), TOP],
            check=True,
        )
        python = os.path.join(venv, "bin", "python")
        subprocess.run([python, "-m", "compileall", "-q", os.path.join(venv, "lib")], check=True)
        subprocess.run(
            [python, "-c", "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"],
            check=True,
        )
        sentry = os.path.join(work, "sentry")
        shutil.copy(os.path.join(TOP, "conf", "sentry"), sentry)
        os.chmod(sentry, 0o755)
        config = os.path.join(work, "daprsystem.yaml")
        shutil.copy(os.path.join(TOP, "conf", "daprsystem.yaml"), config)
        os.chmod(config, 0o644)
        credentials = os.path.join(work, "credentials")
        os.mkdir(credentials, 0o700)
        os.chown(credentials, UID, GID)
        before = tree_state(venv)
        environment = {
            "PATH": f"{os.path.join(venv, 'bin')}:/usr/bin:/bin",
            "HOME": "/nonexistent",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        as_user = ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups"]
        command = as_user + [
            sentry, "--mode", "standalone", "--config", config,
            "--issuer-credentials", credentials, "--log-as-json",
            "--listen-address", "127.0.0.1", "--port", "0",
            # A fixed port: the HEALTHCHECK follows --healthz-port, which
            # it cannot do for 0.
            "--healthz-listen-address", "127.0.0.1", "--healthz-port", str(free_port()),
            "--metrics-listen-address", "127.0.0.1", "--metrics-port", "0",
            "--workers", "2",
        ]
        print("running:", " ".join(command))
        process = subprocess.Popen(
            command, cwd="/", env=environment,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        output = b""
        port = None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        os.set_blocking(process.stdout.fileno(), False)
        while time.monotonic() < deadline and process.poll() is None:
            chunk = process.stdout.read() or b""
            output += chunk
            match = re.search(rb"healthz server listening on port (\d+)", output)
            if match and b"in 2 serving processes" in output:
                port = int(match.group(1))
                break
            time.sleep(0.1)
        problems = []
        if port is None:
            problems.append("never became ready")
        else:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                print(f"healthz: {r.status}")
                if r.status != 200:
                    problems.append(f"healthz answered {r.status}")
            running = owned_by(UID, [work, "/tmp", "/var/tmp", "/dev/shm"], credentials)
            private = [p for p in running if os.path.dirname(p) == "/dev/shm"]
            if len(private) != 1 or not os.path.basename(private[0]).startswith("sentry-tx-"):
                problems.append(f"expected one private directory in /dev/shm: {running}")
            else:
                if os.stat(private[0]).st_mode & 0o777 != 0o700:
                    problems.append(f"{private[0]} is not mode 0700")
                outside = [p for p in running if not p.startswith(private[0])]
                if outside:
                    problems.append(f"written outside the private directory: {outside}")
                print(f"private directory while running: {private[0]}")
            check = subprocess.run(
                as_user + [python, "-m", "sentry_tx", "healthcheck", str(process.pid)],
                cwd="/", env=environment, capture_output=True,
            )
            print(f"HEALTHCHECK command (python -m sentry_tx healthcheck): exit {check.returncode}")
            if check.returncode != 0:
                problems.append(f"healthcheck: {check.stdout!r}")
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            problems.append("did not stop on SIGTERM")
        os.set_blocking(process.stdout.fileno(), True)
        output += process.stdout.read()
        print(f"exit status after SIGTERM: {process.returncode}")
        lines = output.decode("utf-8", "replace").splitlines()
        import json
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                problems.append(f"not JSON: {line}")
                continue
            if record.get("level") in ("warning", "error", "fatal"):
                problems.append(f"{record['level']}: {record.get('msg')}")
        if tree_state(venv) != before:
            changed = set(tree_state(venv).items()) ^ set(before.items())
            problems.append(f"the venv changed: {sorted(changed)[:5]}")
        written = owned_by(UID, [work, "/tmp", "/var/tmp", "/dev/shm"], credentials)
        if written:
            problems.append(f"written outside the credentials directory: {written}")
        print(f"credentials directory: {sorted(os.listdir(credentials))}")
        print(f"{len(lines)} log lines, all JSON" if not any(p.startswith('not JSON') for p in problems) else "")
        if problems:
            print("PROBLEMS:\n  " + "\n  ".join(problems))
            return 1
        print("OK: ran as uid 65532 from a read-only venv; wrote only the bundle")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
