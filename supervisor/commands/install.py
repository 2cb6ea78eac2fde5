"""`cardiacseg-train install-unit` / `uninstall-unit`: put the service in place for this install.

How it works: the unit files and the example config ship inside the package (supervisor/data, kept
identical to the repository's systemd/ and config.toml by a test). `install` rewrites ExecStart to the
`cardiacseg-train` next to the running interpreter (so a venv install works without activation) and
User=/Group= to the chosen account. It creates the system user first (as root), then tests, as that user,
that it can run this install (service_user.probe: a venv made from a Python under /root cannot be run by
it, and systemd would only say status=203/EXEC): if not, it writes nothing and exits 2 saying what to do.
Then it writes both units atomically to <root>/etc/systemd/system (a different existing unit is moved
aside first, never overwritten) and creates <root>/etc/cardiacseg-train/config.toml from the example only
if there is none, mode 0640, group the service user's (the unit reads it as that user): an edited config
is never touched, but one the service user cannot read is reported (exit 2) with the command that fixes
it. `uninstall` moves the unit files aside and keeps config and state. Both print the commands to run
next, with absolute paths (the venv is not on PATH); nothing here starts or stops a service.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from supervisor.core.exit_codes import ExitCode
from supervisor.integrations import service_user
from supervisor.integrations.service_user import DEFAULT_USER
from supervisor.integrations.store import atomic_write, move_aside

DATA = Path(__file__).parent.parent / "data"  # supervisor/data: the unit files and the example config
UNITS = ("cardiacseg-train.service", "cardiacseg-train@.service")
PLACEHOLDER = "/opt/cardiacseg-train/bin/cardiacseg-train"


def executable() -> str:
    local = Path(sys.executable).parent / "cardiacseg-train"
    if local.exists():
        return str(local)
    found = shutil.which("cardiacseg-train")
    return found or f"{sys.executable} -m supervisor"


def render_unit(name: str, exec_cmd: str, user: str = DEFAULT_USER) -> str:
    text = (DATA / name).read_text()
    exe = exec_cmd if " " not in exec_cmd or exec_cmd.endswith("-m supervisor") else shlex.quote(exec_cmd)
    text = text.replace(PLACEHOLDER, exe)
    return text.replace(f"User={DEFAULT_USER}\n", f"User={user}\n").replace(
        f"Group={DEFAULT_USER}\n", f"Group={user}\n")


def install(root: Path, user: str = DEFAULT_USER, create_user: bool = True, out=print) -> int:
    root = Path(root)
    unit_dir = root / "etc/systemd/system"
    conf_dir = root / "etc/cardiacseg-train"
    exe = executable()
    _ensure_user(user, create_user, out)
    problems = service_user.probe(exe, None, user)
    if problems:
        for p in problems:
            out(f"problem: {p}")
        out("nothing written: run install-unit again from an install the service user can run")
        return ExitCode.CONFIG
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        dest = unit_dir / name
        text = render_unit(name, exe, user)
        if dest.exists() and dest.read_text() != text:
            out(f"moved the existing {dest} aside to {move_aside(dest, 'replaced')}")
        atomic_write(dest, text.encode(), 0o644)
        out(f"wrote {dest} (ExecStart={exe} run ...)")
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "config.toml"
    who = service_user.account(user)
    if conf.exists():
        out(f"kept your {conf}")
    else:
        atomic_write(conf, (DATA / "config.example.toml").read_bytes(), 0o640)
        if who is not None and os.geteuid() == 0:
            os.chown(conf, 0, who.gid)  # the unit reads it as the service user; others need not see paths or URLs
        out(f"wrote {conf} from the example (mode 0640, group {user if who else 'root'}): edit it before starting")
    problems = service_user.probe(exe, conf, user)
    if problems is None:
        out(f"could not test as {user} (run install-unit as root): `sudo -u {user} {exe} --version` must work")
    for p in problems or ():
        out(f"problem: {p}")
    out("")
    out("next:")
    out(f"  sudoedit {conf}                      # dataset, paths, target")
    out(f"  sudo -u {user} {exe} check --config {conf}")
    out(f"  # the user {user} needs read access to nnUNet_preprocessed, write access to nnUNet_results and")
    out("  # to the plans file (batch-size step-down), e.g. chown -R or setfacl on your data folders")
    out("  sudo systemctl daemon-reload")
    out("  sudo systemctl enable --now cardiacseg-train")
    out("  journalctl -fu cardiacseg-train")
    out(f"  # several jobs: {conf_dir}/gpu0.toml (mode 0640, group {user}) + "
        "sudo systemctl enable --now cardiacseg-train@gpu0")
    return ExitCode.CONFIG if problems else 0


def _ensure_user(user: str, create_user: bool, out) -> None:
    useradd = ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/cardiacseg-train",
               "--shell", "/usr/sbin/nologin", user]
    if service_user.account(user) is not None:
        out(f"user {user} exists")
    elif create_user and os.geteuid() == 0:
        subprocess.run(useradd, check=True)
        out(f"created system user {user}")
    else:
        out(f"create the service user: sudo {' '.join(useradd)}")


def uninstall(root: Path, out=print) -> int:
    unit_dir = Path(root) / "etc/systemd/system"
    out("first: sudo systemctl disable --now cardiacseg-train  (and any cardiacseg-train@INSTANCE)")
    for name in UNITS:
        p = unit_dir / name
        if p.exists():
            out(f"moved {p} aside to {move_aside(p, 'uninstalled')}")
    out("kept /etc/cardiacseg-train and /var/lib/cardiacseg-train (your config, state and logs)")
    out("then: sudo systemctl daemon-reload")
    return 0
