"""SLURM: the sbatch script, the per-job state directory, the allocation's CPUs, and a real one-node cluster.

The cluster tests submit the script that `slurm-script` prints, with the fake trainer, to a real slurmctld
(Debian's slurm-wlm, started by scripts/slurm-ci.sh: by .ci/run, which hands it over as CARDIACSEG_SLURM_CONF,
or here by the session fixture when the daemons are installed and we are root). They skip, naming the reason, where there
is no SLURM. No sleeps for synchronisation: squeue/scontrol/state.json are polled with a deadline.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATASET, FAKE, REPO, Job, wait_for, write_config
from supervisor.config import job as job_mod
from supervisor.integrations import slurm
from supervisor.integrations.store import STATE_VERSION, StateStore
from supervisor.config.loader import ConfigError, load
from supervisor.commands.status import gather, render

SCRIPT = REPO / "scripts" / "slurm-ci.sh"


# ---- without a cluster ---------------------------------------------------------------------------------
def slurm_config(job: Job, env: dict | None = None, state_dir: str | None = None, **sections) -> Path:
    """Like Job.config, but without [paths] state_dir (the SLURM default applies) and thermal off."""
    base = {
        "training": {"command": [sys.executable, str(FAKE)], "dataset": DATASET, "configuration": "3d_fullres",
                     "fold": 0, "device": "cpu", "expected_epochs": 10},
        "paths": {"preprocessed": str(job.pre), "results": str(job.results)},
        "restart": {"backoff_seconds": 0, "backoff_max_seconds": 0, "max_restarts": 5, "window_minutes": 60},
        "stop": {"timeout_seconds": 20, "checkpoint_wait_seconds": 30},
        "thermal": {"enabled": False},
        "environment": {"FAKE_EPOCH_S": "0.1", **(env or {})},
    }
    if state_dir:
        base["paths"]["state_dir"] = state_dir
    for sec, body in sections.items():
        base.setdefault(sec, {}).update(body)
    return write_config(job.root / "config.toml", base)


def test_state_dir_default_is_per_job_and_array_task(job):
    cfg_path = slurm_config(job)
    root = job.root
    assert load(cfg_path, env={}).paths.state_dir == root / "state"
    assert load(cfg_path, env={"SLURM_JOB_ID": "42"}).paths.state_dir == root / "state" / "slurm-42"
    arr = {"SLURM_JOB_ID": "57", "SLURM_ARRAY_JOB_ID": "55", "SLURM_ARRAY_TASK_ID": "2"}
    assert load(cfg_path, env=arr).paths.state_dir == root / "state" / "slurm-55_2"
    # systemd's STATE_DIRECTORY and an explicit state_dir win over the SLURM default
    assert load(cfg_path, env={**arr, "STATE_DIRECTORY": "/var/lib/x"}).paths.state_dir == Path("/var/lib/x")
    cfg_path = slurm_config(job, state_dir="mine")
    assert load(cfg_path, env=arr).paths.state_dir == root / "mine"


def test_n_proc_da_follows_the_allocation(job):
    cfg = load(slurm_config(job))
    inside = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "3",
              "CUDA_VISIBLE_DEVICES": "1"}
    env = job_mod.build_env(cfg, base=inside)
    assert env["nnUNet_n_proc_DA"] == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"  # as SLURM set it
    assert job_mod.build_env(cfg, base={**inside, "nnUNet_n_proc_DA": "2"})["nnUNet_n_proc_DA"] == "2"
    assert "nnUNet_n_proc_DA" not in job_mod.build_env(cfg, base={"SLURM_CPUS_PER_TASK": "3"})  # not in a job
    cfg = load(slurm_config(job, env={"nnUNet_n_proc_DA": "5"}))
    assert job_mod.build_env(cfg, base=inside)["nnUNet_n_proc_DA"] == "5"  # [environment] wins
    # the supervisor's own view (a host OOM halves from here)
    os.environ.update(SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="1")
    try:
        assert job_mod.configured_workers(load(slurm_config(job))) == 1
    finally:
        del os.environ["SLURM_JOB_ID"], os.environ["SLURM_CPUS_PER_TASK"]


def script(cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "STATE_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "supervisor", "slurm-script", "--config", str(cfg_path), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def sbatch_argv(text: str) -> list[str]:
    """The arguments sbatch takes from a script: a port of SLURM 22.05's reading of #SBATCH lines
    (_opt_batch_script and _get_argument in src/sbatch/opt.c). Lines up to the first one that is neither blank
    nor a comment; on an #SBATCH line, arguments split at unquoted white space, "..." and '...' quote, a
    backslash takes the next character as it is, an unquoted `#` ends the line. A line with `hetjob` or
    `packjob` anywhere (any case) would start another job component: never in a generated script."""
    argv = []
    for line in text.split("\n"):
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break  # the first command: sbatch reads no further
            continue
        assert not re.search("hetjob|packjob", line, re.I), f"a het-job separator: {line!r}"
        rest, i = line[len("#SBATCH"):], 0
        while True:
            while i < len(rest) and rest[i].isspace():
                i += 1
            if i >= len(rest):
                break
            arg, quote, escaped = [], "", False
            while i < len(rest) and (quote or not rest[i].isspace()):
                c = rest[i]
                i += 1
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                    continue
                elif quote:
                    if c == quote:
                        quote = ""
                        continue
                elif c in "\"'":
                    quote = c
                    continue
                elif c == "#":
                    i = len(rest)
                    break
                arg.append(c)
            assert not quote, f"unmatched quote: {line!r}"
            if arg:
                argv.append("".join(arg))
    return argv


def sbatch_options(text: str) -> dict:
    return dict(a[2:].partition("=")[::2] for a in sbatch_argv(text))


def test_slurm_script_default_epoch_time_and_options(job):
    cfg_path = slurm_config(job)
    r = script(cfg_path, "--partition", "gpu", "--time", "2-00:00:00", "--gpus", "2", "--cpus-per-task", "8",
               "--mem", "64G")
    assert r.returncode == 0, r.stderr
    o = sbatch_options(r.stdout)
    assert o["requeue"] == "" and o["open-mode"] == "append"
    # no epoch measured: 300 s default + stop.timeout_seconds 20 + 60 s margin
    assert o["signal"] == "B:USR1@380"
    assert (o["partition"], o["time"], o["gres"], o["cpus-per-task"], o["mem"]) == ("gpu", "2-00:00:00", "gpu:2",
                                                                                   "8", "64G")
    assert "array" not in o
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("exec ") and last.endswith(f"-m supervisor run --config {cfg_path}")
    assert r.stderr == ""
    # device cpu asks for no GPU by default
    assert "gres" not in sbatch_options(script(cfg_path).stdout)


def test_slurm_script_uses_the_measured_epoch_time_and_an_array_over_folds(job):
    cfg_path = slurm_config(job)
    d = job.root / "state" / "slurm-99_1"  # a SLURM run's state, found from the login node
    d.mkdir(parents=True)
    cfg = load(cfg_path, env={})
    (d / "state.json").write_text(json.dumps({"version": STATE_VERSION, "job": job_mod.job_identity(cfg),
                                              "epochs": [{"epoch": i, "epoch_time": t}
                                                         for i, t in enumerate([100.0, 140.0, 120.0, 1e3])]}))
    r = script(cfg_path, "--folds", "0,1,2", "--time", "1")
    assert r.returncode == 0, r.stderr
    o = sbatch_options(r.stdout)
    assert o["signal"] == "B:USR1@210"  # median 130 + 20 + 60
    assert o["array"] == "0,1,2" and o["output"].endswith("slurm-%A_%a.out")
    assert r.stdout.rstrip().endswith('--fold "$SLURM_ARRAY_TASK_ID"')
    assert "SIGUSR1 at once" in r.stderr  # a one-minute limit is shorter than the signal's lead
    # folds share nothing: a state_dir set in the file would be one state directory for three tasks
    r = script(slurm_config(job, state_dir="shared"), "--folds", "0,1")
    assert r.returncode == 2 and "state_dir" in r.stderr
    assert script(cfg_path, "--folds", "0,x").returncode == 2
    assert slurm.signal_seconds(0, 0) == 60


def test_status_shows_the_job_from_the_login_node(job):
    cfg_path = slurm_config(job)
    cfg = load(cfg_path, env={})
    d = job.root / "state" / "slurm-12_0"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({
        "version": 1, "job": job_mod.job_identity(cfg), "sup": {"state": "done", "outcome": "completed"},
        "slurm": {"job_id": "14", "array_job_id": "12", "array_task": "0", "node": "gpu07", "restart_count": 2,
                  "spec": "12_0"}}))
    info = gather(cfg)
    assert info["state_dir"] == str(d)
    assert info["slurm"] == {"job_id": "14", "array_job_id": "12", "array_task": "0", "node": "gpu07",
                             "requeues": 2, "spec": "12_0"}
    assert "slurm:        job 12_0 (array 12, task 0) on node gpu07, requeued 2 times" in render(info)
    assert slurm.job_spec({"SLURM_JOB_ID": "14", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "0"}) == "12_0"


def test_run_fold_overrides_the_config(job):
    from supervisor.commands.cli import build_parser

    args = build_parser().parse_args(["run", "--config", "x", "--fold", "3"])
    assert args.fold == 3
    assert build_parser().parse_args(["run", "--config", "x", "--fold", "all"]).fold == "all"


# ---- hostile input: nothing in the config or on the command line ends the #SBATCH block or adds a command ----
HOSTILE_NAMES = ["x\nrm -rf ~", "x\r#SBATCH --wrap=id", "x; touch PWNED", "$(touch PWNED)", "a b", "-rf", "a/b"]


@pytest.mark.parametrize("key_", ["dataset", "configuration", "trainer", "plans"])
@pytest.mark.parametrize("value", HOSTILE_NAMES)
def test_names_nnunet_would_not_take_are_refused_naming_the_key(job, key_, value):
    cfg_path = slurm_config(job, training={key_: value})
    with pytest.raises(ConfigError) as e:
        load(cfg_path, env={})
    msg = str(e.value)
    assert f"training.{key_}: expected" in msg and str(cfg_path) in msg, msg
    if any(c in value for c in "\r\n"):
        assert "control characters" in msg, msg


def test_real_names_are_still_accepted(job):
    for training in ({"dataset": "Dataset027_ACDC", "configuration": "3d_cascade_fullres",
                      "trainer": "nnUNetTrainer_250epochs", "plans": "nnUNetResEncUNetMPlans"},
                     {"dataset": 27, "configuration": "3d_fullres_bs4", "plans": "nnUNetPlans_v2.1+x"},
                     {"dataset": "27"}):
        assert load(slurm_config(job, training=training), env={}).training.dataset == str(training["dataset"])
    cfg_path = slurm_config(job, queue={"configurations": ["2d", "3d_fullres"]})
    assert load(cfg_path, env={}).queue.configurations == ("2d", "3d_fullres")
    with pytest.raises(ConfigError, match="queue.configurations: expected"):
        load(slurm_config(job, queue={"configurations": ["2d", "x\n#SBATCH --wrap=id"]}), env={})


@pytest.mark.parametrize("command", ["check", "run", "slurm-script"])
def test_check_run_and_slurm_script_refuse_a_newline_in_a_name(job, command):
    cfg_path = slurm_config(job, training={"trainer": "nnUNetTrainer\n#SBATCH --wrap=touch PWNED"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, "-m", "supervisor", command, "--config", str(cfg_path)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"configuration error in {cfg_path}" in r.stderr and "training.trainer: expected" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "#SBATCH" not in r.stdout


RECORDER = "import json, os, sys\nopen(os.environ['RECORD'], 'w').write(json.dumps(sys.argv[1:]))\n"
# every character a folder name may hold that means something to bash or to sbatch
HOSTILE_FOLDER = "cfg dir $(touch PWNED1) `touch PWNED2` 'sq' \"dq\" %j #hash ;&|<>*? hetJOB ~"


def first_command(text: str) -> int:
    lines = text.split("\n")
    return next(i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#"))


@pytest.mark.parametrize("folds", [None, [0, 2]])
def test_slurm_script_is_injection_safe_in_a_folder_with_a_space(job, tmp_path, folds):
    """A config in a folder with a space and shell/sbatch metacharacters, a dataset whose name holds `hetjob`,
    hostile --partition/--mem, an [environment] value with newlines: sbatch reads exactly the options written
    (a port of its parser), bash runs exactly `exec PYTHON ... run --config PATH` (a real bash, the command
    replaced by a recorder), nothing else runs, and bash -n is happy."""
    folder = tmp_path / HOSTILE_FOLDER
    folder.mkdir()
    evil_env = "x\n#SBATCH --wrap=touch PWNED3\ntouch PWNED4"
    cfg_path = slurm_config(job, env={"EVIL": evil_env}, training={"dataset": "Dataset001_HetJob+x"})
    cfg_path = cfg_path.rename(folder / "config.toml")
    cfg = load(cfg_path, env={})
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    partition, mem = 'gpu"; touch PWNED5 #', "64G'$(touch PWNED6)"
    text, _ = slurm.sbatch_script(cfg, command=[sys.executable, str(recorder)], partition=partition, mem=mem,
                                  time="1-00:00:00", folds=folds)
    assert "PWNED3" not in text and "PWNED4" not in text  # [environment] never enters the script
    lines = text.split("\n")
    first = first_command(text)
    assert lines[first].startswith("exec ") and first == len(lines) - 2
    assert [ln for ln in lines[first:] if ln.startswith("#SBATCH")] == []  # every option before the first command
    o = sbatch_options(text)
    assert o["job-name"] == "cardiacseg-Dataset001_HetJob+x-3d_fullres"
    assert (o["partition"], o["mem"], o["time"]) == (partition, mem, "1-00:00:00")
    out = "slurm-%A_%a.out" if folds else "slurm-%j.out"
    assert o["output"] == str(folder).replace("%", "%%") + "/" + out
    assert ("array" in o) == bool(folds) and o.get("array", "0,2") == "0,2"
    assert subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True).returncode == 0
    path = tmp_path / "job.sh"
    path.write_text(text)
    record = tmp_path / "argv.json"
    env = {"PATH": os.environ["PATH"], "RECORD": str(record), "SLURM_ARRAY_TASK_ID": "2"}
    r = subprocess.run(["bash", str(path)], cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(record.read_text()) == ["run", "--config", str(cfg_path), *(["--fold", "2"] if folds else [])]
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


@pytest.mark.parametrize("folds", [None, "0,1"])
def test_generated_script_passes_shellcheck(job, tmp_path, folds):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck; .ci/run installs it as root)")
    folder = tmp_path / "a folder with spaces"
    folder.mkdir()
    cfg_path = slurm_config(job).rename(folder / "config.toml")
    r = script(cfg_path, "--partition", "gpu a", "--time", "1:00:00", *(["--folds", folds] if folds else []))
    assert r.returncode == 0, r.stderr
    sc = subprocess.run(["shellcheck", "--shell=bash", "-"], input=r.stdout, text=True, capture_output=True,
                        timeout=60)
    assert sc.returncode == 0, sc.stdout + sc.stderr


@pytest.mark.parametrize("where,args,needle", [
    ("folder", (), "cannot be written into the sbatch script"),
    ("backslash", (), "holds a backslash"),
    ("arg", ("--partition", "gpu\n#SBATCH --wrap=id"), "--partition"),
    ("arg", ("--mem", "1G\rx"), "--mem"),
])
def test_a_value_that_cannot_be_written_is_refused(job, tmp_path, where, args, needle):
    cfg_path = slurm_config(job)
    if where != "arg":
        folder = tmp_path / ("new\nline" if where == "folder" else "back\\slash")
        folder.mkdir()
        cfg_path = cfg_path.rename(folder / "config.toml")
    r = script(cfg_path, *args)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert needle in r.stderr and "slurm-script for" in r.stderr and "Traceback" not in r.stderr


# ---- a real cluster ------------------------------------------------------------------------------------
def _sinfo_ok(env) -> bool:
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """SLURM_CONF of the cluster these tests started: the one .ci/run started for them (handed over as
    CARDIACSEG_SLURM_CONF), or one started (and stopped) here. A SLURM_CONF the shell happens to have (the
    site's cluster, another test run's) is never used: jobs would be submitted to somebody else's cluster."""
    conf = os.environ.get("CARDIACSEG_SLURM_CONF")
    if conf and shutil.which("sinfo") and _sinfo_ok(_env(conf)) and _ours(conf):
        yield conf
        return
    if os.environ.get("CARDIACSEG_SLURM_SKIP"):
        pytest.skip(f"SLURM tests skipped: {os.environ['CARDIACSEG_SLURM_SKIP']}")
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        pytest.skip("SLURM tests need slurmctld and sbatch (Debian: apt-get install slurm-wlm munge; "
                    ".ci/run installs them as root)")
    if os.geteuid() != 0:
        pytest.skip("SLURM tests start slurmd, which needs root")
    # not below pytest's tmp folder: munged (user munge) must reach its socket, and that folder is 0700
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="cardiacseg-slurm-"))
    r = subprocess.run(["bash", str(SCRIPT), "start", str(scratch)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        pytest.skip(f"could not start a SLURM cluster: {r.stderr.strip()[-500:]}")
    try:
        yield str(scratch / "slurm.conf")
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(scratch)], capture_output=True, timeout=120)
        shutil.rmtree(scratch, ignore_errors=True)


def _ours(conf: str) -> bool:
    """The controller that answers on conf's port is the cluster conf describes (its ClusterName)."""
    name = next((ln.split("=", 1)[1].strip() for ln in Path(conf).read_text().splitlines()
                 if ln.startswith("ClusterName=")), None)
    r = subprocess.run(["scontrol", "show", "config"], env=_env(conf), capture_output=True, text=True, timeout=30)
    return name is not None and r.returncode == 0 and any(
        ln.split("=", 1)[0].strip() == "ClusterName" and ln.split("=", 1)[1].strip() == name
        for ln in r.stdout.splitlines())


def _env(conf: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "STATE_DIRECTORY"}
    return {**env, "SLURM_CONF": conf, "PYTHONUNBUFFERED": "1"}


def _cmd(conf: str, *argv: str, check=True) -> str:
    r = subprocess.run(list(argv), env=_env(conf), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv}: exit {r.returncode}: {r.stderr}")
    return r.stdout


def submit(conf: str, job: Job, cfg_path: Path, *args: str) -> tuple[str, str]:
    r = script(cfg_path, *args)
    assert r.returncode == 0, r.stderr
    path = job.root / "job.sh"
    path.write_text(r.stdout)
    # cwd: the repository, so that `python -m supervisor` in the job imports this checkout
    out = subprocess.run(["sbatch", "--parsable", str(path)], cwd=REPO, env=_env(conf), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0], r.stdout


def show(conf: str, spec: str) -> dict:
    """`scontrol show job SPEC` as KEY=VALUE pairs (first record)."""
    text = _cmd(conf, "scontrol", "show", "job", spec, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", text.split("\n\n")[0]))


def state(d: Path) -> dict:
    try:
        return StateStore(d).read() or {}
    except (OSError, ValueError):
        return {}


def wait_done(conf: str, spec: str, timeout: float, job: Job) -> dict:
    def done():
        j = show(conf, spec)
        return j if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None
    try:
        return wait_for(done, timeout=timeout, interval=0.5, what=f"job {spec} to end")
    except AssertionError:
        outs = "".join(p.read_text()[-3000:] for p in job.root.glob("slurm-*.out"))
        raise AssertionError(f"job {spec} did not end in {timeout} s: {show(conf, spec)}\n{outs}") from None


def evidence(conf: str, spec: str) -> str:
    j = show(conf, spec)
    return " ".join(f"{k}={j.get(k)}" for k in ("JobId", "ArrayJobId", "ArrayTaskId", "JobState", "Reason",
                                                    "Restarts", "BatchHost"))


def epochs_lost(attempts: list[dict]) -> list[int]:
    """Per preempted attempt: epochs it finished (by the logs) that the next attempt ran again."""
    lost = []
    for a, b in zip(attempts, attempts[1:]):
        if a.get("reason") == "preempted" and a.get("epoch_reached") is not None:
            lost.append(a["epoch_reached"] + 1 - b["epoch_start"])
    return lost


def test_usr1_stops_at_a_safe_point_requeues_and_resumes(cluster, job, capsys):
    cfg_path = slurm_config(job, env={"FAKE_EPOCH_S": "0.4", "FAKE_EPOCHS": "14"},
                            training={"expected_epochs": 14})
    t0 = time.monotonic()
    jid, text = submit(cluster, job, cfg_path, "--cpus-per-task", "1")
    d = job.root / "state" / f"slurm-{jid}"
    wait_for(lambda: len(state(d).get("epochs", [])) >= 3, timeout=90, interval=0.2, what="3 epochs")
    _cmd(cluster, "scancel", "--signal=USR1", "--batch", jid)
    end = wait_done(cluster, jid, 120, job)
    line = evidence(cluster, jid)
    assert end["JobState"] == "COMPLETED" and end["Restarts"] == "1", line
    s = state(d)
    reasons = [a["reason"] for a in s["attempts"]]
    assert reasons[0] == "preempted" and reasons[-1] == "completed", reasons
    assert s["sup"]["outcome"] == "completed"
    assert "--c" in s["attempts"][1]["argv"] and s["attempts"][1]["resume_from"]
    assert s["slurm"]["restart_count"] == 1 and s["slurm"]["spec"] == jid
    assert [e["epoch"] for e in s["epochs"]] == list(range(14))
    lost = epochs_lost(s["attempts"])
    assert lost and all(n <= 0 for n in lost), lost  # checkpoint every epoch: no finished epoch is run again
    out = (job.root / f"slurm-{jid}.out").read_text()  # --open-mode=append: both runs' output
    assert out.count("supervisor_started") == 2 and "requeued" in out
    # the login node: no SLURM variables, state found below state/
    r = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(cfg_path), "--json"],
                       cwd=REPO, env=_env(cluster), capture_output=True, text=True, timeout=60)
    info = json.loads(r.stdout)
    assert info["slurm"]["requeues"] == 1 and info["slurm"]["job_id"] == jid
    assert [h["reason"] for h in info["history"]] == reasons and info["restarts"] == 0  # no restart budget used
    with capsys.disabled():
        print(f"\n[slurm] {line}; history {reasons}; epochs lost per requeue {lost}; "
              f"{time.monotonic() - t0:.0f} s")


def test_array_of_three_folds_one_task_preempted(cluster, job, capsys):
    cfg_path = slurm_config(job, env={"FAKE_EPOCH_S": "0.3", "FAKE_EPOCHS": "8"}, training={"expected_epochs": 8})
    t0 = time.monotonic()
    aid, text = submit(cluster, job, cfg_path, "--folds", "0,1,2", "--cpus-per-task", "1")
    assert "#SBATCH --array=0,1,2" in text
    d1 = job.root / "state" / f"slurm-{aid}_1"
    wait_for(lambda: len(state(d1).get("epochs", [])) >= 2, timeout=90, interval=0.2, what="task 1: 2 epochs")
    _cmd(cluster, "scancel", "--signal=USR1", "--batch", f"{aid}_1")
    ends = {t: wait_done(cluster, f"{aid}_{t}", 150, job) for t in (0, 1, 2)}
    lines = [evidence(cluster, f"{aid}_{t}") for t in (0, 1, 2)]
    assert all(e["JobState"] == "COMPLETED" for e in ends.values()), lines
    assert ends[1]["Restarts"] == "1" and ends[0]["Restarts"] == ends[2]["Restarts"] == "0", lines
    for t in (0, 1, 2):
        s = state(job.root / "state" / f"slurm-{aid}_{t}")
        assert s["job"]["fold"] == t and s["sup"]["outcome"] == "completed", (t, s.get("sup"))
        assert (job.results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres" / f"fold_{t}" /
                "checkpoint_final.pth").is_file()
        assert s["slurm"]["spec"] == f"{aid}_{t}"
    s1 = state(d1)
    assert [a["reason"] for a in s1["attempts"]] == ["preempted", "completed"]
    with capsys.disabled():
        print("\n[slurm] " + " | ".join(lines) + f"; {time.monotonic() - t0:.0f} s")


def test_a_real_time_limit_is_survived_by_requeue(cluster, job, capsys):
    """--time=2: SLURM itself sends SIGUSR1 50 s before the limit (its time-limit check runs every ~30 s, so
    70-100 s into each run); the work (22 x 6 s) is longer than one run, so it takes a second run, which
    continues with --c. The lead is set as a user does once the epoch time is known (the script's default,
    from an unknown epoch time, would be longer than the whole limit: SLURM would then signal every run at
    its launch, which the generator warns about)."""
    cfg_path = slurm_config(job, env={"FAKE_EPOCH_S": "6", "FAKE_EPOCHS": "22"}, training={"expected_epochs": 22})
    t0 = time.monotonic()
    r = script(cfg_path, "--time", "2", "--cpus-per-task", "1")
    assert r.returncode == 0 and '#SBATCH --time="2"' in r.stdout, r.stderr
    text = re.sub(r"--signal=B:USR1@\d+", "--signal=B:USR1@50", r.stdout)
    assert "--signal=B:USR1@50" in text
    path = job.root / "job.sh"
    path.write_text(text)
    out = subprocess.run(["sbatch", "--parsable", str(path)], cwd=REPO, env=_env(cluster), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    jid = out.stdout.strip().split(";")[0]
    end = wait_done(cluster, jid, 600, job)
    line = evidence(cluster, jid)
    d = job.root / "state" / f"slurm-{jid}"
    s = state(d)
    reasons = [a["reason"] for a in s["attempts"]]
    # (a run that SLURM signalled at its launch, before the batch shell's exec, ended as JobLaunchFailure:
    # the cause of the failures this test saw with --time=1, where the lead was longer than the limit)
    assert int(end["Restarts"]) >= 1, (line, reasons)
    assert end["JobState"] == "COMPLETED", (line, reasons)
    assert reasons[-1] == "completed" and set(reasons[:-1]) == {"preempted"}, reasons
    assert [e["epoch"] for e in s["epochs"]] == list(range(22))
    lost = epochs_lost(s["attempts"])
    with capsys.disabled():
        print(f"\n[slurm] {line}; history {reasons}; epochs lost per requeue {lost}; "
              f"{time.monotonic() - t0:.0f} s")



def _kill_hard(d: Path) -> None:
    """SIGKILL the supervisor and the trainer's process group at once: what a node crash does to them."""
    import signal as _signal

    s = state(d)
    os.kill(s["supervisor"]["pid"], _signal.SIGKILL)
    os.killpg(s["attempts"][-1]["pgid"], _signal.SIGKILL)


def test_a_resubmitted_job_resumes_after_a_node_crash(cluster, job, capsys):
    """No signal, no requeue (SIGKILL to the supervisor and the trainer, as when the node dies): a new job
    (new id, new state folder) continues from the fold's checkpoints with --c."""
    cfg_path = slurm_config(job, env={"FAKE_EPOCH_S": "0.3", "FAKE_EPOCHS": "10"}, training={"expected_epochs": 10})
    jid, _ = submit(cluster, job, cfg_path, "--cpus-per-task", "1")
    d = job.root / "state" / f"slurm-{jid}"
    wait_for(lambda: len(state(d).get("epochs", [])) >= 3, timeout=90, interval=0.2, what="3 epochs")
    _kill_hard(d)
    first = wait_done(cluster, jid, 60, job)
    assert first["Restarts"] == "0"
    reached = max(e["epoch"] for e in state(d)["epochs"])
    jid2, _ = submit(cluster, job, cfg_path, "--cpus-per-task", "1")
    end = wait_done(cluster, jid2, 90, job)
    s = state(job.root / "state" / f"slurm-{jid2}")
    assert end["JobState"] == "COMPLETED" and s["sup"]["outcome"] == "completed", (first, end, s.get("sup"))
    a = s["attempts"][0]
    assert "--c" in a["argv"] and a["resume_from"] and a["epoch_start"] <= reached + 1
    with capsys.disabled():
        print(f"\n[slurm] killed job {jid} ({first.get('JobState')}) at epoch {reached}; resubmitted {jid2} started at "
              f"epoch {a['epoch_start']} from {a['resume_from']}: {evidence(cluster, jid2)}")


def test_scancel_is_not_undone_by_a_requeue(cluster, job, capsys):
    """`scancel JOB` sends SIGTERM like a preemption does; the supervisor must not requeue a cancelled job."""
    cfg_path = slurm_config(job, env={"FAKE_EPOCH_S": "0.3", "FAKE_EPOCHS": "30"}, training={"expected_epochs": 30})
    jid, _ = submit(cluster, job, cfg_path, "--cpus-per-task", "1")
    d = job.root / "state" / f"slurm-{jid}"
    wait_for(lambda: len(state(d).get("epochs", [])) >= 2, timeout=90, interval=0.2, what="2 epochs")
    _cmd(cluster, "scancel", jid)
    end = wait_done(cluster, jid, 60, job)
    # the supervisor has ended (its state is final) and the job stays cancelled: not requeued
    wait_for(lambda: state(d).get("sup", {}).get("state") in ("done", "failed"), timeout=30, what="the end")
    end = show(cluster, jid)
    s = state(d)
    assert end["JobState"] == "CANCELLED" and end["Restarts"] == "0", (evidence(cluster, jid), s["sup"])
    assert "not requeued" in s["sup"]["message"]
    with capsys.disabled():
        print(f"\n[slurm] {evidence(cluster, jid)}; outcome {s['sup']['outcome']}: {s['sup']['message']}")
