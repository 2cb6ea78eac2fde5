"""The progress picture: drawn from a realistic history, one marker per event, redrawn in the background."""
import json
import threading
import time

from supervisor.integrations import plot
from supervisor.integrations.plot import example_snapshot, figure, markers, render
from supervisor.integrations.publish import Sinks
from test_notify import RecLog, make_cfg


def test_render_realistic_history(tmp_path):
    from matplotlib.image import imread
    snap = example_snapshot()
    out = tmp_path / "progress.png"
    ms = render(snap, out)
    assert [(m["kind"], m["epoch"]) for m in ms] == [("restart", 18), ("oom", 31), ("thermal_pause", 44),
                                                     ("thermal_stop", 53), ("stop", 79)]
    assert ms[0]["label"] == "restart: crash" and "6\u21925" in ms[1]["label"] and "target_reached" in ms[-1]["label"]
    img = imread(out)
    assert img.shape[:2] == (700, 1100) and out.stat().st_size > 20_000
    assert img[..., :3].std() > 0.05  # not blank
    fig, ms2 = figure(snap)
    top = fig.axes[0]
    lines = [ln for ln in top.get_lines() if (ln.get_gid() or "").startswith("marker-")]
    assert sorted(ln.get_gid() for ln in lines) == sorted(f"marker-{m['kind']}" for m in ms2)
    assert sorted(t.get_text().strip() for t in top.texts) == sorted(m["label"] for m in ms2)
    assert len([ln for ln in top.get_lines() if ln.get_label() == "EMA pseudo Dice"]) == 1
    assert [ln.get_ydata()[0] for ln in top.get_lines() if ln.get_label().startswith("target")] == \
        [snap["settings"]["ema_dice"]]
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [e["epoch_time"] for e in snap["epochs"]]


def test_markers_tolerate_missing_keys():
    assert markers({}) == []
    assert markers({"attempts": [{"n": 1}, {"n": 2}], "epochs": [{"epoch": 3}]}) == [
        {"kind": "restart", "epoch": 4, "label": "restart: restart"}]


def test_redrawn_in_the_background_one_at_a_time_at_most_once_a_minute(tmp_path, monkeypatch):
    running, peak, calls = [0], [0], []
    gate = threading.Event()
    lock = threading.Lock()

    def slow_draw(self, snap):  # the drawing child process, replaced at its boundary
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(10)
        calls.append(len(snap["epochs"]))
        with lock:
            running[0] -= 1

    monkeypatch.setattr(Sinks, "_draw", slow_draw)
    sinks = Sinks.open(make_cfg(tmp_path, metrics_sec={"plot": True}), RecLog(), env={})
    full = example_snapshot()
    full["sup"] = {**full.get("sup", {}), "outcome": None}  # still training: the interval applies
    t0 = time.perf_counter()
    for n in range(1, 30):
        sinks.snapshot({**full, "epochs": full["epochs"][:n]})
    assert time.perf_counter() - t0 < 0.5  # the loop never waits for a drawing
    gate.set()
    assert sinks.plot_worker.wait_idle(10)
    assert peak[0] == 1 and calls == [1]  # fast epochs: one drawing a minute, not one per epoch
    sinks.close(5)
    assert calls == [1, 29]               # ... and the newest at the end


def test_sinks_draw_into_state_dir_with_thermal_marks(tmp_path):
    cfg = make_cfg(tmp_path, metrics_sec={"plot": True})
    snap = example_snapshot()
    snap.pop("marks")
    sinks = Sinks.open(cfg, RecLog(), env={})
    sinks.snapshot({**snap, "epochs": snap["epochs"][:45]})
    from supervisor.core.actions import StateChanged
    sinks.publish(StateChanged("running", "paused", "thermal_pause", 3, {"temps": {"0": 88.0}}))  # last snapshot
    sinks.snapshot(snap)
    assert sinks.plot_worker.wait_idle(30)
    sinks.close(5)
    assert plot.default_path(cfg) == cfg.paths.state_dir / "progress.png"
    assert plot.default_path(cfg).stat().st_size > 20_000
    assert json.loads((cfg.paths.state_dir / plot.MARKS_FILE).read_text())[0]["kind"] == "thermal_pause"
    assert [m["kind"] for m in plot.load_marks(cfg.paths.state_dir)] == ["thermal_pause"]


def test_main_from_state_json(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    assert plot.main(cfg, None) == 1  # nothing yet
    from supervisor.config import job
    snap = example_snapshot()
    snap.update(version=1, job=job.job_identity(cfg))
    (cfg.paths.state_dir / "state.json").write_text(json.dumps(snap))
    out = tmp_path / "p.png"
    assert plot.main(cfg, out) == 0 and out.stat().st_size > 20_000
    assert str(out) in capsys.readouterr().out


def test_classes_are_named_a_class_at_zero_shows_and_labels_stay_inside(tmp_path):
    """dataset.json's names in the legend; a class stuck at 0.0 above the x axis; the stop label (at the
    last epoch) and the legend inside the picture, on a short run like the demo's."""
    demo = {"job": {"dataset": "Dataset900_DemoCardiac", "configuration": "3d_fullres", "fold": 0},
            "sup": {"state": "done", "outcome": "target_reached"}, "settings": {"ema_dice": 0.42},
            "class_names": ["LV", "MYO", "RV"],
            "attempts": [{"n": 1, "epoch_start": 0, "epoch_reached": 1, "reason": "crash"},
                         {"n": 2, "epoch_start": 2, "epoch_reached": 5, "reason": "target_reached"}],
            "epochs": [{"epoch": i, "dice": [0.3 + 0.1 * i, 0.2 + 0.1 * i, 0.0], "ema": 0.1 + 0.06 * i,
                        "epoch_time": 9.0} for i in range(6)]}
    for snap in (demo, example_snapshot()):
        fig, ms = figure(snap)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        top = fig.axes[0]
        if snap is demo:
            assert [t.get_text() for t in top.get_legend().get_texts()][:3] == ["LV", "MYO", "RV"]
            rv = next(ln for ln in top.get_lines() if ln.get_label() == "RV")
            # drawn above the axis: in pixels, strictly inside the axes' box
            y_px = top.transData.transform((2, rv.get_ydata()[2]))[1]
            assert top.bbox.y0 < y_px < top.bbox.y1
        for t in top.texts + [top.get_legend()]:
            box = t.get_window_extent(renderer)
            assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, (t, box, fig.bbox)
        stop = next(t for t in top.texts if t.get_gid() == "label-stop")
        assert stop.get_window_extent(renderer).x1 <= top.bbox.x1  # inside the plot, left of its line


def test_main_names_the_classes_from_dataset_json(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    from supervisor.config import job
    ds = job.plans_file(cfg).parent
    ds.mkdir(parents=True, exist_ok=True)
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "RV": 3, "LV": 1, "MYO": 2}}))
    assert job.class_names(cfg) == ["LV", "MYO", "RV"]  # in label order, as nnU-Net's pseudo Dice
    drawn = {}
    monkeypatch.setattr(plot, "render", lambda snap, out: drawn.update(snap) or [])
    snap = example_snapshot()
    snap.update(version=1, job=job.job_identity(cfg))
    (cfg.paths.state_dir / "state.json").write_text(json.dumps(snap))
    assert plot.main(cfg, tmp_path / "p.png") == 0 and drawn["class_names"] == ["LV", "MYO", "RV"]
    (ds / "dataset.json").write_text("not json")
    assert job.class_names(cfg) is None  # then "class 1", "class 2", ...
