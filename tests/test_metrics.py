"""Metrics: the textfile parsed with prometheus_client's own parser, the /metrics endpoint scraped."""
import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config.loader import ConfigError
from supervisor.integrations.metrics import STATES, families
from supervisor.integrations.plot import example_snapshot
from supervisor.integrations.publish import Sinks
from test_notify import RecLog, make_cfg


def samples(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def snap(state="running", **sup):
    s = example_snapshot()
    s["sup"] = {**s["sup"], "state": state, "outcome": None, **sup}
    s["temps"] = {"0": {"celsius": 74.0, "uuid": "GPU-abc"}}
    return s


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_textfile_is_written_and_parses(tmp_path):
    prom = tmp_path / "tf" / "cardiacseg_train.prom"
    prom.parent.mkdir()
    sinks = Sinks.open(make_cfg(tmp_path, metrics_sec={"textfile": str(prom)}), RecLog(), env={})
    s = snap()
    sinks.snapshot(s)
    assert sinks.metrics_worker.wait_idle(10)
    m = samples(prom.read_text())
    last = s["epochs"][-1]
    assert m[("cardiacseg_train_epoch", ())] == 79
    assert m[("cardiacseg_train_ema_pseudo_dice", ())] == pytest.approx(last["ema"])
    assert m[("cardiacseg_train_best_ema_pseudo_dice", ())] == pytest.approx(max(e["ema"] for e in s["epochs"]))
    for i, d in enumerate(last["dice"]):
        assert m[("cardiacseg_train_pseudo_dice", (("class", str(i + 1)),))] == pytest.approx(d)
    assert m[("cardiacseg_train_target_pseudo_dice", ())] == pytest.approx(s["settings"]["ema_dice"])
    assert m[("cardiacseg_train_epoch_duration_seconds", ())] == pytest.approx(last["epoch_time"])
    assert m[("cardiacseg_train_batch_size", ())] == 5
    assert m[("cardiacseg_train_restarts_total", (("reason", "crash"),))] == 1
    assert m[("cardiacseg_train_restarts_total", (("reason", "cuda_oom"),))] == 1
    assert m[("cardiacseg_train_restarts_total", (("reason", "thermal_stop"),))] == 1
    assert [st for st in STATES if m[("cardiacseg_train_state", (("state", st),))] == 1] == ["running"]
    assert m[("cardiacseg_train_paused", ())] == 0
    assert m[("cardiacseg_gpu_temperature_celsius", (("gpu", "0"), ("uuid", "GPU-abc")))] == 74
    assert m[("cardiacseg_train_last_update_timestamp_seconds", ())] == s["updated_at"]
    info = [k for k in m if k[0] == "cardiacseg_train_info"][0]
    assert dict(info[1]) == {"dataset": "Dataset001_CardiacSeg", "configuration": "3d_fullres", "fold": "0",
                             "trainer": "nnUNetTrainer", "plans": "nnUNetPlans"}
    sinks.snapshot(snap("paused"))  # every state change rewrites it
    sinks.close(5)
    m = samples(prom.read_text())
    assert m[("cardiacseg_train_paused", ())] == 1 and m[("cardiacseg_train_state", (("state", "paused"),))] == 1
    assert sorted(p.name for p in prom.parent.iterdir()) == [prom.name]  # temp files renamed, none left
    assert not any(n.startswith("cardiacseg") for n in REGISTRY._names_to_collectors)  # private registry


def test_http_endpoint_is_scraped(tmp_path):
    port = free_port()
    log = RecLog()
    sinks = Sinks.open(make_cfg(tmp_path, metrics_sec={"listen": f"127.0.0.1:{port}"}), log, env={})
    try:
        sinks.snapshot(snap(batch_size=3))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            m = samples(r.read().decode())
        assert m[("cardiacseg_train_batch_size", ())] == 3
        sinks.snapshot(snap("cooling", batch_size=2))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            m = samples(r.read().decode())
        assert m[("cardiacseg_train_batch_size", ())] == 2
        assert m[("cardiacseg_train_state", (("state", "cooling"),))] == 1
        assert log.events("metrics_listening")
    finally:
        sinks.close(5)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize("listen", ["0.0.0.0:9108", "localhost:9108", "127.example.com:9108", "127.0.0.1.nip.io:9108",
                                    "127.1:9108", "::1:9108", "[::]:9108", "192.168.1.5:9108", "127.0.0.1:0",
                                    "127.0.0.1:65536", "127.0.0.1", "127.0.0.1:\u0663"])
def test_listen_accepts_only_loopback_ip_literals(tmp_path, listen):
    """A host name (even `localhost`, or one starting with `127.`) is not a loopback IP literal."""
    with pytest.raises(ConfigError) as e:
        make_cfg(tmp_path, metrics_sec={"listen": listen})
    msg = str(e.value)
    assert str(tmp_path / "config.toml") in msg and "metrics.listen: expected" in msg and "loopback IP" in msg
    assert "not a host name" in msg, msg


def test_check_refuses_a_host_name_for_listen_naming_file_and_key(tmp_path):
    import subprocess
    import sys
    from conftest import REPO
    p = tmp_path / "config.toml"
    p.write_text('[training]\ndataset = "Dataset001_X"\n[paths]\npreprocessed = "pre"\nresults = "res"\n'
                 '[metrics]\nlisten = "127.evil.example:9108"\n')
    for cmd in ("check", "run"):
        r = subprocess.run([sys.executable, "-m", "supervisor", cmd, "--config", str(p)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert str(p) in r.stderr and "metrics.listen: expected" in r.stderr and "loopback IP" in r.stderr
        assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("host", ["127.0.0.2", "[::1]"])
def test_other_loopback_literals_are_served(tmp_path, host):
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.bind((host.strip("[]"), 0))
            port = s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"{host} is not usable on this machine: {e}")
    sinks = Sinks.open(make_cfg(tmp_path, metrics_sec={"listen": f"{host}:{port}"}), RecLog(), env={})
    try:
        sinks.snapshot(snap(batch_size=4))
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            assert samples(r.read().decode())[("cardiacseg_train_batch_size", ())] == 4
    finally:
        sinks.close(5)


def test_a_busy_port_does_not_raise(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        log = RecLog()
        sinks = Sinks.open(make_cfg(tmp_path, metrics_sec={"listen": f"127.0.0.1:{busy.getsockname()[1]}"}),
                           log, env={})
        sinks.snapshot(snap())
        sinks.close(2)
        assert log.events("metrics_listen_failed")


def test_partial_snapshot_never_raises():
    names = {f.name for f in families({})}
    assert {"cardiacseg_train", "cardiacseg_train_state", "cardiacseg_train_paused"} <= names
    assert "cardiacseg_train_epoch" not in names  # unknown is absent, not 0
