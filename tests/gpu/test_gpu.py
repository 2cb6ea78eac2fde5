"""The GPU acceptance run (skipped without CUDA/NVML, each test with its reason): `make gpu-check`, at most
about 8 minutes on one GPU, one JSON summary at the end (tests/gpu/conftest.py).

1. NVML reads: temperature, utilisation, memory, clock-event reasons, ECC/retirement health, and the
   driver's CUDA version against torch's build.
2. A real CUDA OOM under the supervisor (the fake trainer allocates a real fraction of the card per batch
   element), classified cuda_oom, stepped down in the plans and resumed with --c.
3. A thermal pause caused by a limit set just below the measured temperature; then the limit is raised by
   a reload and the run resumes and completes.
4. Restart to first epoch with and without the compile cache (bench/compile_cache_bench.py on the GPU).
5. Real nnU-Net on the demo data to the target on the GPU.
The batch-size fit's own GPU test lives beside these (its choice and probe table go in the summary too).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
from conftest import REPO, Job, wait_for  # noqa: E402
from supervisor.commands import demo  # noqa: E402
from supervisor.integrations import gpu_health  # noqa: E402
from supervisor.integrations.environment import driver_cuda_version  # noqa: E402
from supervisor.integrations.nvml import Nvml  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.skipif(Nvml.open() is None, reason="no NVML")]


def test_real_nvml_readings(summary):
    nv = Nvml.open()
    assert nv.count >= 1
    idx, why = nv.select(None)
    assert why is None and idx
    r = nv.read(idx[0])
    h = gpu_health.read(nv, idx[0])
    driver = driver_cuda_version()
    summary["nvml"] = {**r.to_json(), "health": h.__dict__, "driver_cuda": driver,
                       "torch_cuda": torch.version.cuda, "torch": torch.__version__,
                       "gpu_name": torch.cuda.get_device_name(0)}
    assert r.celsius is not None and 10 <= r.celsius <= 110
    assert r.mem_used_mib is not None and r.util_percent is not None
    assert r.uuid and r.uuid.startswith("GPU-")
    assert not r.lost


def test_real_cuda_oom_steps_down_under_the_supervisor(tmp_path, summary):
    job = Job(tmp_path)
    doc = json.loads(job.plans.read_text())
    doc["configurations"]["3d_fullres"]["batch_size"] = 3  # 3 x 0.45 of the card does not fit; 2 x 0.45 does
    job.plans.write_text(json.dumps(doc, indent=4))
    cfg = job.config(env={"FAKE_CUDA_FRACTION": "0.45", "FAKE_EPOCHS": "3"},
                     training={"device": "cuda"}, thermal={"enabled": True, "poll_seconds": 1})
    rc, out = job.run(cfg, timeout=300)
    print(out[-4000:])
    assert rc == 0
    st = job.state_json()
    reasons = [a["reason"] for a in st["attempts"]]
    summary["cuda_oom"] = {"attempts": reasons, "argv_last": st["attempts"][-1]["argv"][-1],
                           "batch_size": json.loads(job.plans.read_text())["configurations"]["3d_fullres"]["batch_size"]}
    assert reasons[0] == "cuda_oom" and reasons[-1] == "completed"
    assert "torch.OutOfMemoryError" in open(st["attempts"][0]["log"]).read()  # a REAL one
    assert "--c" in st["attempts"][-1]["argv"]
    assert summary["cuda_oom"]["batch_size"] == 2


def test_a_thermal_pause_below_the_measured_temperature_then_a_reload_resumes(tmp_path, summary):
    nv = Nvml.open()
    idx, _ = nv.select(None)
    now = nv.read(idx[0]).celsius
    job = Job(tmp_path)
    pause = max(20, int(now) - 2)
    cfg = job.config(env={"FAKE_EPOCHS": "8", "FAKE_EPOCH_S": "1"}, training={"device": "cuda"},
                     thermal={"enabled": True, "poll_seconds": 1, "pause_celsius": pause,
                              "resume_celsius": pause - 5, "stop_celsius": 105, "max_pause_minutes": 10})
    p = job.start(cfg)
    try:
        wait_for(lambda: (job.state / "state.json").exists() and job.state_json()["sup"]["state"] == "paused",
                 timeout=120, what="a thermal pause")
        paused_at = time.monotonic()
        text = cfg.read_text()
        cfg.write_text(text.replace(f"pause_celsius = {pause}", "pause_celsius = 100")
                       .replace(f"resume_celsius = {pause - 5}", "resume_celsius = 99"))
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: job.state_json()["sup"]["state"] != "paused", timeout=60, what="the resume")
        out, _ = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    st = job.state_json()
    summary["thermal"] = {"measured_celsius": now, "pause_celsius": pause, "outcome": st["sup"]["outcome"],
                          "paused_s": round(time.monotonic() - paused_at, 1)}
    assert p.returncode == 0 and st["sup"]["outcome"] == "completed"
    assert "thermal_pause" in out and "thermal_resume" in out


def test_compile_cache_restart_times(summary):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "compile_cache_bench.py"), "--device", "cuda"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    summary["compile_cache"] = res
    assert res["with_cache"]["cache_bytes"] > 0


def test_real_nnunet_to_the_target_on_the_gpu_with_the_thermal_guard(tmp_path, summary):
    demo.make_dataset(tmp_path / "raw")
    demo.preprocess(tmp_path)
    cfg = demo.demo_config(tmp_path, crash_at=None)
    text = cfg.read_text().replace('device = "cpu"', 'device = "cuda"')
    cfg.write_text(text + '\n[thermal]\nenabled = true\npoll_seconds = 1\n')
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=540, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(r.stderr[-4000:])
    st = json.loads((tmp_path / "state" / "state.json").read_text())
    th = json.loads((tmp_path / "state" / "thermal.json").read_text())
    summary["nnunet_target"] = {"outcome": st["sup"]["outcome"], "epochs": len(st["epochs"]),
                                "epoch_times": [e["epoch_time"] for e in st["epochs"]],
                                "seconds": round(time.monotonic() - t0, 1), "gpu": th["readings"][0]}
    assert r.returncode == 0
    assert st["sup"]["outcome"] in ("target_reached", "completed")
    assert th["readings"] and th["readings"][0]["celsius"] is not None


def test_real_batch_size_fit_on_the_gpu(tmp_path):
    """The fit's probe (issue 25 item 1) with nnU-Net's real training step on this GPU: the demo dataset's
    3d_fullres network on a 128^3 patch, the dataset cap raised so that the GPU's memory is the limit.
    Prints the chosen batch size and the probe table in one JSON line."""
    from supervisor.core import batch_fit
    from supervisor.integrations import fit

    demo.make_dataset(tmp_path / "raw")
    plans = demo.preprocess(tmp_path)
    doc = json.loads(plans.read_text())
    doc["configurations"]["3d_fullres"].update(patch_size=[128, 128, 128], median_image_size_in_voxels=[256, 256, 256])
    plans.write_text(json.dumps(doc, indent=4))
    ds = json.loads((plans.parent / "dataset.json").read_text())
    (plans.parent / "dataset.json").write_text(json.dumps({**ds, "numTraining": 1000}))  # cap 400: memory binds
    req = {"plans": str(plans), "dataset_json": str(plans.parent / "dataset.json"), "dataset": demo.DEMO_NAME,
           "configuration": "3d_fullres", "trainer": "nnUNetTrainer", "plans_name": "nnUNetPlans", "fold": "0",
           "batch_size": 2, "headroom": 0.1, "iterations": 3, "max_seconds": 240}
    env = {**demo.nnunet_env(tmp_path), "nnUNet_results": str(tmp_path / "scratch"), "nnUNet_compile": "f"}
    env.pop(fit.MODEL_ENV, None)
    r = subprocess.run([sys.executable, "-m", "supervisor.trainer.fit_probe", json.dumps(req)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=env)
    ev = fit.to_event(fit.read_answer_text(r.stdout), tmp_path / "log")
    chosen, why = batch_fit.choose([list(x) for x in ev.table], ev.total_bytes, 0.1, ev.upper)
    print("FIT " + json.dumps({"chosen": chosen, "why": why, "gpu": ev.gpu,
                               "total_gib": round((ev.total_bytes or 0) / 2**30, 1), "upper": ev.upper, "stopped": ev.stopped, "error": ev.error,
                               "table": [[b, None if p is None else round(p / 2**30, 2), s] for b, p, s in ev.table]}))
    assert ev.error is None, r.stdout[-3000:] + r.stderr[-3000:]
    assert not ev.model and ev.uuid and ev.table[0][1] is not None and chosen is not None and chosen >= 2
