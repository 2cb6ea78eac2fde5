"""A real systemd for tests: PID 1 of its own namespaces, and the service installed in it as the README says.

How it works: scripts/systemd-ci.sh boots systemd in a new PID + mount namespace whose /etc, /var, /tmp and
/run are its own (nothing of the host is written: see the script), with the scratch folder's opt/ as /opt
and this venv's site-packages read-only at /opt/ro/1. `.ci/run` starts one before the suite and hands it
over as CARDIACSEG_SYSTEMD_DIR (or the reason it could not, CARDIACSEG_SYSTEMD_SKIP); elsewhere, as root, a
test starts (and ends) its own; without root, unshare or systemd the tests skip, naming why.
`Systemd` reaches inside with nsenter (systemctl, journalctl, runuser) and reads files through
/proc/<its pid>/root. `install_service` installs the project the way a user does: a venv made from the
system's Python at /opt/cardiacseg-train (the wheel of this tree, and the supervisor's light dependencies
copied from this venv: no network), then `cardiacseg-train install-unit` as root. torch, nnU-Net and
matplotlib come from this venv's site-packages through a .pth file placed after the venv's own packages:
what `pip install` of the heavy dependencies would give, without 6 GB of copying.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import FAKE, REPO, wait_for

SCRIPT = REPO / "scripts" / "systemd-ci.sh"
VENV = "/opt/cardiacseg-train"
LIGHT = ("psutil", "structlog", "nvidia-ml-py", "prometheus_client")  # what the supervisor itself imports
TRAINER = "/opt/data/bin/nnUNetv2_train"  # the fake trainer, under nnU-Net's program name


class Unavailable(Exception):
    """Why a real systemd cannot run here (the tests skip with it)."""


def host_site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def why_not() -> str | None:
    """Why this machine cannot boot one (None: it can)."""
    if os.geteuid() != 0:
        return "booting systemd in a namespace needs root (.ci/run runs the suite as root)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not os.access("/lib/systemd/systemd", os.X_OK):
        return "systemd is not installed (Debian: apt-get install systemd; .ci/run installs it as root)"
    r = subprocess.run(["/usr/bin/python3", "-c", "import sys, ensurepip, venv; print(sys.version_info[:2])"],
                       capture_output=True, text=True) if os.access("/usr/bin/python3", os.X_OK) else None
    if r is None or r.returncode != 0:
        return "the service's venv is made from /usr/bin/python3 with venv and ensurepip (Debian: python3-venv)"
    if r.stdout.strip() != str(tuple(sys.version_info[:2])):
        return (f"torch in this venv is built for Python {sys.version_info[0]}.{sys.version_info[1]}, the system's "
                f"/usr/bin/python3 is {r.stdout.strip()}: the service's venv could not import it")
    return None


class Systemd:
    def __init__(self, scratch: Path, pid: int, owned: bool):
        self.scratch, self.pid, self.owned = scratch, pid, owned

    @classmethod
    def boot(cls, scratch: Path) -> "Systemd":
        r = subprocess.run(["bash", str(SCRIPT), "start", str(scratch), str(host_site())], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise Unavailable(f"scripts/systemd-ci.sh could not boot systemd: {r.stderr.strip()[-500:]}")
        return cls(scratch, int((scratch / "systemd.pid").read_text()), owned=True)

    @classmethod
    def attach(cls, scratch: Path) -> "Systemd":
        pid = int((scratch / "systemd.pid").read_text())
        os.kill(pid, 0)
        return cls(scratch, pid, owned=False)

    def stop(self) -> None:
        if self.owned:
            subprocess.run(["bash", str(SCRIPT), "stop", str(self.scratch)], capture_output=True, timeout=60)

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "--wd=/", "--", *argv]

    def run(self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 120):
        r = subprocess.run(self.argv(*argv), input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return r

    def sh(self, script: str, **kw):
        return self.run("sh", "-ec", script, **kw)

    def systemctl(self, *args: str, check: bool = True):
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *extra: str) -> list[dict]:
        out = self.run("journalctl", "--no-pager", "-o", "json", "-u", unit, *extra).stdout
        entries = []
        for line in out.splitlines():
            e = json.loads(line)
            msg = e.get("MESSAGE")
            e["MESSAGE"] = bytes(msg).decode(errors="replace") if isinstance(msg, list) else (msg or "")
            entries.append(e)
        return entries

    def messages(self, unit: str, *extra: str) -> list[str]:
        return [e["MESSAGE"] for e in self.journal(unit, *extra)]

    def host(self, path: str) -> Path:
        """A file inside, as this side reads it."""
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def write(self, path: str, text: str) -> None:
        """Like sudoedit: the file keeps its owner and mode (a new one is root's, 0644)."""
        self.run("sh", "-c", 'cat > "$1"', "sh", path, input=text)

    def wait_state(self, unit: str, active: str, timeout: float = 60) -> dict:
        return wait_for(lambda: (s := self.show(unit, "ActiveState", "SubState", "Result", "ExecMainStatus",
                                                "NRestarts", "MainPID", "StatusText"))["ActiveState"] == active
                        and s, timeout=timeout, interval=0.1, what=f"{unit} {active}")


def install_service(sd: Systemd) -> str:
    """/opt/cardiacseg-train from this tree, then `install-unit` as root; returns what install-unit printed."""
    opt = sd.scratch / "opt"
    wheels, deps = opt / "wheels", opt / "deps"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in LIGHT:
        dist = md.distribution(name)
        for f in dist.files or ():
            src = Path(str(dist.locate_file(f)))
            if str(f).startswith("..") or "__pycache__" in str(f) or not src.is_file():
                continue
            (deps / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, deps / f)
    site = f"{VENV}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    sd.sh(f"/usr/bin/python3 -m venv {VENV}\n"
          f"{VENV}/bin/pip install -q --no-index --no-deps /opt/wheels/*.whl\n"
          f"cp -a /opt/deps/. {site}/\n"
          f"echo /opt/ro/1 > {site}/zz-heavy-dependencies.pth", timeout=300)
    out = sd.run(f"{VENV}/bin/cardiacseg-train", "install-unit")
    data = opt / "data"
    (data / "bin").mkdir(parents=True, exist_ok=True)
    (data / "bin" / "nnUNetv2_train").write_text(f"#!{VENV}/bin/python\n" + FAKE.read_text())
    (data / "bin" / "nnUNetv2_train").chmod(0o755)
    # The tests' only change to the units: systemd restarts after 1 s instead of 60 s.
    for unit in ("cardiacseg-train.service", "cardiacseg-train@.service"):
        sd.sh(f"mkdir -p /etc/systemd/system/{unit}.d\n"
              f"printf '[Service]\\nRestartSec=1s\\n' > /etc/systemd/system/{unit}.d/ci.conf")
    sd.systemctl("daemon-reload")
    return out.stdout + out.stderr
