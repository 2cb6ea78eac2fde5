"""training.command relative to the config file's folder, whatever the current directory (systemd: /)."""
import os
import subprocess
import sys

from supervisor.config import job
from supervisor.config.loader import load

SCRIPT = "import sys; print('script ran:', ' '.join(sys.argv[1:4]))\n"


def write_config(folder, command, extra_args=()):
    p = folder / "config.toml"
    q = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    p.write_text(f'[training]\ndataset = "Dataset001_X"\ncommand = {q(command)}\nextra_args = {q(extra_args)}\n'
                 f'[paths]\npreprocessed = "pre"\nresults = "res"\n')
    return load(p, env={})


def run_from_root(argv):
    return subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=60)


def test_relative_script_argument_runs_from_cwd_root(tmp_path):
    (tmp_path / "nnunet_train.py").write_text(SCRIPT)
    cfg = write_config(tmp_path, [sys.executable, "nnunet_train.py"])
    argv = job.build_argv(cfg, resume=False)
    assert argv[:2] == [sys.executable, str(tmp_path / "nnunet_train.py")]
    r = run_from_root(argv)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "script ran: Dataset001_X 3d_fullres 0"


def test_relative_program_with_a_slash_runs_from_cwd_root(tmp_path):
    prog = tmp_path / "scripts" / "train.sh"
    prog.parent.mkdir()
    prog.write_text('#!/bin/sh\necho "program ran: $1 $2"\n')
    os.chmod(prog, 0o755)
    for spelled in ("scripts/train.sh", "./scripts/train.sh"):
        cfg = write_config(tmp_path, [spelled])
        argv = job.build_argv(cfg, resume=True)
        assert os.path.isabs(argv[0]) and os.path.samefile(argv[0], prog)
        r = run_from_root(argv)
        assert r.returncode == 0 and r.stdout.strip() == "program ran: Dataset001_X 3d_fullres", r.stderr


def test_only_existing_relative_paths_are_rewritten(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "x.py").write_text(SCRIPT)
    cfg = write_config(tmp_path, ["python3", "-u", "scripts/x.py", "fast", "-m", "/abs/y.py"],
                       extra_args=["--npz"])
    argv = job.build_argv(cfg, resume=False)
    assert argv[:6] == ["python3", "-u", str(tmp_path / "scripts" / "x.py"), "fast", "-m", "/abs/y.py"]
    assert argv[-1] == "--npz"


def test_bare_name_missing_from_path_is_found_next_to_the_interpreter(tmp_path):
    name = os.path.basename(sys.executable)
    cfg = write_config(tmp_path, [name])
    assert job.resolve_command(cfg, path="/nonexistent")[0] == str(
        os.path.join(os.path.dirname(sys.executable), name))
    cfg = write_config(tmp_path, ["no-such-program-xyz"])
    assert job.resolve_command(cfg, path="/nonexistent") == ["no-such-program-xyz"]
