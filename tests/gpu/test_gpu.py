"""GPU checks (skipped without CUDA/NVML): real NVML readings, a real CUDA OOM under the supervisor, and a
few real nnU-Net epochs on the GPU with the thermal guard reading NVML. Run: `make gpu-check`."""
import json
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
from conftest import REPO, Job  # noqa: E402
from supervisor.commands import demo  # noqa: E402
from supervisor.integrations.nvml import Nvml  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.skipif(Nvml.open() is None, reason="no NVML")]


def test_real_nvml_readings():
    nv = Nvml.open()
    assert nv.count >= 1
    idx, why = nv.select(None)
    assert why is None and idx
    r = nv.read(idx[0])
    print("NVML reading:", json.dumps(r.to_json()))
    assert r.celsius is not None and 10 <= r.celsius <= 110
    assert r.mem_used_mib is not None and r.util_percent is not None
    assert r.uuid and r.uuid.startswith("GPU-")
    assert not r.lost


def test_real_cuda_oom_steps_down_under_the_supervisor(tmp_path):
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
    assert reasons[0] == "cuda_oom" and reasons[-1] == "completed"
    assert "torch.OutOfMemoryError" in open(st["attempts"][0]["log"]).read()  # a REAL one
    assert json.loads(job.plans.read_text())["configurations"]["3d_fullres"]["batch_size"] == 2


def test_real_nnunet_epochs_on_the_gpu_with_nvml_thermal_guard(tmp_path):
    demo.make_dataset(tmp_path / "raw")
    demo.preprocess(tmp_path)
    cfg = demo.demo_config(tmp_path, target=None, crash_at=None, epochs=3)
    text = cfg.read_text().replace('device = "cpu"', 'device = "cuda"')
    cfg.write_text(text + '\n[thermal]\nenabled = true\npoll_seconds = 1\n')
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=540)
    print(r.stderr[-4000:])
    assert r.returncode == 0
    st = json.loads((tmp_path / "state" / "state.json").read_text())
    assert st["sup"]["outcome"] == "completed" and [e["epoch"] for e in st["epochs"]] == [0, 1, 2]
    th = json.loads((tmp_path / "state" / "thermal.json").read_text())
    assert th["readings"] and th["readings"][0]["celsius"] is not None
    print(f"3 real epochs on the GPU under the supervisor in {time.monotonic() - t0:.0f} s; "
          f"epoch times {[e['epoch_time'] for e in st['epochs']]}; GPU {th['readings'][0]}")
