"""What the service user reaches (issue 24), without systemd: install-unit's and check's test as that user
(the interpreter, the venv, the config), the config's group, and another user's trainer on the fold.

The real service (systemd as PID 1 of a namespace) is tests/test_systemd_real.py; here the user is
`nobody`, the interpreter a script whose #! line points into a folder only root may enter (what a venv made
from pyenv's Python under /root is)."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from supervisor.commands import install
from supervisor.core.actions import Adopt
from supervisor.core.events import Start
from supervisor.core.exit_codes import ExitCode
from supervisor.core.policy import decide
from supervisor.core.record import State, Sup
from supervisor.integrations import other_trainers, service_user
from test_policy import cfg

NOBODY = service_user.account("nobody")
as_root = pytest.mark.skipif(os.geteuid() != 0 or NOBODY is None,
                             reason="testing as another user needs root and the user nobody")


@pytest.fixture
def open_dir():
    """A folder every user may enter (pytest's tmp_path lies below /tmp/pytest-of-root, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="cardiacseg-su-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def script(path: Path, interpreter: str, body: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{interpreter}\n{body}")
    path.chmod(0o755)
    return path


def closed_python(root: Path) -> Path:
    """bin/python3 -> a Python inside a folder only root may enter (pyenv's /root/.pyenv, mode 0700)."""
    (root / "private").mkdir(mode=0o700)
    (root / "private" / "python3").symlink_to("/bin/sh")
    (root / "venv" / "bin").mkdir(parents=True)
    (root / "venv" / "bin" / "python3").symlink_to(root / "private" / "python3")
    return script(root / "venv" / "bin" / "cardiacseg-train", str(root / "venv" / "bin" / "python3"), "echo 0.1\n")


def test_blocker_names_the_first_folder_the_user_may_not_enter_following_links(open_dir):
    who = service_user.Account("someone", 4242, 4242, (4242,))
    exe = closed_python(open_dir)
    assert service_user.blocker(exe, who) is None  # the script itself is fine
    where = service_user.blocker(open_dir / "venv" / "bin" / "python3", who)
    assert where == f"{open_dir / 'private'} (mode 0700, root:root)"
    conf = open_dir / "config.toml"
    conf.write_text("")
    conf.chmod(0o640)
    assert service_user.blocker(conf, who, 4) == f"{conf} (mode 0640, root:root)"
    if os.geteuid() == 0:
        os.chown(conf, 0, 4242)
        assert service_user.blocker(conf, who, 4) is None  # its group may read it


@as_root
def test_install_unit_refuses_an_install_the_service_user_cannot_run(open_dir, monkeypatch):
    exe = closed_python(open_dir)
    monkeypatch.setattr(install, "executable", lambda: str(exe))
    lines: list[str] = []
    rc = install.install(open_dir / "root", user="nobody", create_user=False, out=lines.append)
    out = "\n".join(lines)
    assert rc == ExitCode.CONFIG, out
    assert f"{open_dir / 'private'} (mode 0700, root:root) keeps it out" in out
    assert "status=203/EXEC" in out and "/usr/bin/python3 -m venv" in out and "outside /root" in out
    assert "nothing written" in out and not (open_dir / "root" / "etc").exists()


@as_root
def test_install_unit_writes_a_config_the_service_user_can_read_and_absolute_hints(open_dir, monkeypatch):
    exe = script(open_dir / "venv" / "bin" / "cardiacseg-train", "/bin/sh", "echo 0.1\n")
    monkeypatch.setattr(install, "executable", lambda: str(exe))
    lines: list[str] = []
    root = open_dir / "root"
    assert install.install(root, user="nobody", create_user=False, out=lines.append) == 0, lines
    conf = root / "etc/cardiacseg-train/config.toml"
    st = conf.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0 and st.st_gid == NOBODY.gid
    out = "\n".join(lines)
    assert f"sudo -u nobody {exe} check --config {conf}" in out
    assert f"sudoedit {conf}" in out and "problem" not in out
    # a config of yours that the service user cannot read is kept as it is, and reported with the fix
    conf.chmod(0o600)
    lines.clear()
    assert install.install(root, user="nobody", create_user=False, out=lines.append) == ExitCode.CONFIG
    out = "\n".join(lines)
    assert f"kept your {conf}" in out and f"cannot read {conf}" in out
    assert f"chgrp nobody {conf} && chmod 0640 {conf}" in out and stat.S_IMODE(conf.stat().st_mode) == 0o600


def test_a_trainer_of_a_user_we_may_not_signal_is_refused_even_with_take_over():
    theirs = ((4242, "nnUNetv2_train Dataset001_X 3d_fullres 0", "", "researcher"),)
    for take_over in (False, True):
        s, acts = decide(Sup(), Start(others=theirs, take_over=take_over), 0, cfg())
        assert s.state == State.FAILED and s.exit_code == ExitCode.CONFIG
        assert "pid 4242 (user researcher)" in s.message
        assert "`--take-over` cannot stop it" in s.message and "researcher or root stop it" in s.message
        assert not any(isinstance(a, Adopt) for a in acts)
    ours = ((4242, "nnUNetv2_train Dataset001_X 3d_fullres 0", "", ""),)
    s, acts = decide(Sup(), Start(others=ours, take_over=True), 0, cfg())
    assert s.state == State.STOP_PENDING and any(isinstance(a, Adopt) for a in acts)


def test_other_trainers_names_the_user_when_a_signal_would_be_refused(monkeypatch):
    import psutil

    me = psutil.Process()
    assert other_trainers._owner_out_of_reach(me) == ""

    def refused(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(other_trainers.os, "kill", refused)
    assert other_trainers._owner_out_of_reach(me) == me.username()
    o = other_trainers.Other(7, "nnUNetv2_train 1 2d 0", "", "researcher")
    assert other_trainers.describe([o]) == "pid 7 (user researcher): nnUNetv2_train 1 2d 0"
    assert other_trainers.as_event([o]) == ((7, "nnUNetv2_train 1 2d 0", "", "researcher"),)
