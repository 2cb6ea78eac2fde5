"""Can the service user reach what systemd starts: the interpreter, the installed package, the config?

How it works: systemd runs ExecStart as User=cardiacseg. A venv whose interpreter is a link into a Python
installed under /root (mode 0700: pyenv, conda, a hand-built Python) cannot be executed by that user, and
systemd then reports `status=203/EXEC` with nothing in the journal; a config only root may read ends the
first start with exit 2, which systemd never restarts. `probe` tests both as that user, the way the kernel
will: as root it runs `<cardiacseg-train> --version` (the interpreter, its standard library, the venv's
site-packages and the package) and `test -r CONFIG` with the user's uid, gid and groups (subprocess
user=/group=/extra_groups=). When one fails, `blocker` walks the path, and every link it follows, and names
the first folder the user may not enter or file it may not read, from mode bits, owner and group (ACLs,
SELinux or a noexec mount are named as the remaining suspects when the bits allow it). As the service user
itself only the config is left to test; as any other user nothing can be tested (None: the caller prints
the command that tests it by hand).
"""
from __future__ import annotations

import grp
import os
import pwd
import shlex
import stat
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "cardiacseg"
SERVICE_CONFIG_DIR = Path("/etc/cardiacseg-train")  # the unit's ConfigurationDirectory
FIX = ("build the install from a Python the service user can reach: a system Python (Debian/Ubuntu: "
       "`apt-get install python3-venv`, then `/usr/bin/python3 -m venv /opt/cardiacseg-train` and "
       "`/opt/cardiacseg-train/bin/pip install /path/to/cardiacseg-train`), or one installed outside /root "
       "and /home (e.g. `pyenv install` with PYENV_ROOT=/opt/pyenv); a venv keeps using the Python it was made from")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def account(name: str) -> Account | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)))


def _allowed(st: os.stat_result, who: Account, bit: int) -> bool:
    """May `who` read (4) / enter or execute (1) a file with these mode bits, owner and group?"""
    if who.uid == 0:
        return bit != 1 or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
    shift = 6 if st.st_uid == who.uid else 3 if st.st_gid in who.groups else 0
    return bool((st.st_mode >> shift) & bit)


def _describe(path: Path, st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, {owner}:{group})"


def blocker(path: str | Path, who: Account, want: int = 1, _depth: int = 0) -> str | None:
    """The first folder on the way to `path` (links followed) that `who` may not enter, or `path` itself when
    it may not be read (want=4) or executed (want=1); None when the mode bits allow it all."""
    path = Path(os.path.abspath(path))
    here = Path(path.anchor)
    for part in path.parts[1:]:
        try:
            st = os.stat(here)
        except OSError:
            return None
        if not _allowed(st, who, 1):
            return _describe(here, st)
        here = here / part
        if here.is_symlink() and _depth < 40:
            target = Path(os.readlink(here))
            rest = path.relative_to(here)
            return blocker((here.parent / target / rest) if str(rest) != "." else here.parent / target, who, want,
                           _depth + 1)
    try:
        st = os.stat(here)
    except OSError:
        return None
    return None if _allowed(st, who, want) else _describe(here, st)


def needed(exe: str) -> list[tuple[str, int]]:
    """What executing `exe` needs, with the access (1 execute, 4 read): the command, the interpreter of its #!
    line, the standard library and the installed package (the running interpreter's: `exe` is this install's
    own command)."""
    argv = shlex.split(exe)
    paths = [(argv[0], 1)]
    try:
        with open(argv[0], "rb") as fh:
            first = fh.readline(512)
        if first.startswith(b"#!"):
            paths.append((first[2:].decode(errors="replace").split()[0], 1))
    except OSError:
        pass
    import supervisor
    return paths + [(sysconfig.get_paths()["stdlib"] + "/os.py", 4),
                    (str(Path(supervisor.__file__).parent / "__main__.py"), 4)]


def probe(exe: str, config: Path | None, user: str = DEFAULT_USER) -> list[str] | None:
    """Problems the service user meets starting `exe run --config CONFIG` ([] when none); None when this
    process can test nothing (neither root nor that user), or that user does not exist."""
    who = account(user)
    if who is None:
        return None
    problems: list[str] = []
    if os.geteuid() == 0:
        problems += _as(who, shlex.split(exe) + ["--version"], exe)
    elif os.geteuid() != who.uid:
        return None
    if config is not None and not _readable(who, config):
        where = blocker(config, who, 4)
        problems.append(f"the service user {user} cannot read {config}" + (f": {where} keeps it out" if where else "")
                        + f"; `run` would exit 2 on the first start, which systemd does not restart. Fix: "
                        f"`chgrp {user} {config} && chmod 0640 {config}` (and the folder must let it in)")
    return problems


def _as(who: Account, argv: list[str], exe: str) -> list[str]:
    try:
        r = subprocess.run(argv, user=who.uid, group=who.gid, extra_groups=list(who.groups), cwd="/",
                           env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0:
            return []
        said = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    except OSError as e:
        said = f"{e.strerror}" if e.strerror else str(e)
    except subprocess.TimeoutExpired:
        return [f"`{exe} --version` as the service user {who.name} did not answer within 60 s"]
    where = next((b for p, want in needed(exe) for b in [blocker(p, who, want)] if b), None)
    why = (f"{where} keeps it out" if where else
           "the mode bits allow it: look at ACLs (getfacl), SELinux/AppArmor, or a noexec mount")
    return [f"the service user {who.name} cannot run {exe} ({said}): {why}. systemd would fail with "
            f"status=203/EXEC and nothing in the journal. Fix: {FIX}"]


def _readable(who: Account, path: Path) -> bool:
    if os.geteuid() != 0:
        return os.access(path, os.R_OK)
    try:
        return subprocess.run(["test", "-r", str(path)], user=who.uid, group=who.gid, extra_groups=list(who.groups),
                              cwd="/", env={"PATH": "/usr/bin:/bin"}, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def unit_user(root: Path = Path("/")) -> str:
    """User= of the installed unit (what systemd will run as), else the default."""
    unit = root / "etc/systemd/system/cardiacseg-train.service"
    try:
        for line in unit.read_text().splitlines():
            if line.startswith("User="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return DEFAULT_USER


def check_findings(config: Path, exe: str) -> list[tuple[str, str]]:
    """`check`'s findings for a config of the service (in /etc/cardiacseg-train): tested as the unit's user."""
    if Path(config).absolute().parent != SERVICE_CONFIG_DIR:
        return []
    user = unit_user()
    if account(user) is None:
        return [("warning", f"service: the user {user} does not exist yet (`install-unit` creates it)")]
    problems = probe(exe, config, user)
    if problems is None:
        return [("warning", f"service: run check as root or as {user} to test what the service user reaches "
                            f"(`sudo -u {user} {exe} --version`)")]
    return [("fatal", f"service: {p}") for p in problems] or [
        ("ok", f"service: the user {user} can run {exe} and read {config}")]

