"""`cardiacseg-train install-unit` / `uninstall-unit`: put the service in place for this install.

How it works: the unit files and the example config ship inside the package (supervisor/data, kept
identical to the repository's systemd/ and config.toml by a test). `install` rewrites ExecStart to the
`cardiacseg-train` next to the running interpreter (so a venv install works without activation) and
User=/Group= to the chosen account, writes both units atomically to <root>/etc/systemd/system (a
different existing unit is moved aside first, never overwritten), creates the system user when run as
root, and creates <root>/etc/cardiacseg-train/config.toml from the example only if there is none: an
edited config is never touched. `uninstall` moves the unit files aside and keeps config and state.
Both print the systemctl commands to run next; nothing here starts or stops a service.
"""
from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from supervisor.integrations.store import atomic_write, move_aside

DATA = Path(__file__).parent.parent / "data"  # supervisor/data: the unit files and the example config
UNITS = ("cardiacseg-train.service", "cardiacseg-train@.service")
PLACEHOLDER = "/opt/cardiacseg-train/bin/cardiacseg-train"
DEFAULT_USER = "cardiacseg"


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


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def install(root: Path, user: str = DEFAULT_USER, create_user: bool = True, out=print) -> int:
    root = Path(root)
    unit_dir = root / "etc/systemd/system"
    conf_dir = root / "etc/cardiacseg-train"
    unit_dir.mkdir(parents=True, exist_ok=True)
    exe = executable()
    for name in UNITS:
        dest = unit_dir / name
        text = render_unit(name, exe, user)
        if dest.exists() and dest.read_text() != text:
            out(f"moved the existing {dest} aside to {move_aside(dest, 'replaced')}")
        atomic_write(dest, text.encode(), 0o644)
        out(f"wrote {dest} (ExecStart={exe} run ...)")
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "config.toml"
    if conf.exists():
        out(f"kept your {conf}")
    else:
        atomic_write(conf, (DATA / "config.example.toml").read_bytes(), 0o640)
        out(f"wrote {conf} from the example: edit it before starting")
    useradd = ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/cardiacseg-train",
               "--shell", "/usr/sbin/nologin", user]
    if _user_exists(user):
        out(f"user {user} exists")
    elif create_user and os.geteuid() == 0:
        subprocess.run(useradd, check=True)
        out(f"created system user {user}")
    else:
        out(f"create the service user: sudo {' '.join(useradd)}")
    out("")
    out("next:")
    out(f"  $EDITOR {conf}")
    out(f"  cardiacseg-train check --config {conf}")
    out(f"  # the user {user} needs read access to nnUNet_preprocessed, write access to nnUNet_results and")
    out("  # to the plans file (batch-size step-down), e.g. chown -R or setfacl on your data folders")
    out("  sudo systemctl daemon-reload")
    out("  sudo systemctl enable --now cardiacseg-train")
    out("  journalctl -fu cardiacseg-train")
    out("  # several jobs: /etc/cardiacseg-train/gpu0.toml + systemctl enable --now cardiacseg-train@gpu0")
    return 0


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
