"""The plans-file batch size: inheritance, preservation of everything else, atomicity, step sequence."""
import json
import os

import pytest

from supervisor.integrations import plans
from supervisor.integrations.plans import PlansError, next_batch_size, read_batch_size, set_batch_size, step_sequence

PLANS = {
    "dataset_name": "Dataset001_CardiacSeg",
    "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [1.0, 0.7421875, 0.7421875],
    "configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d", "batch_size": 12, "patch_size": [320, 320]},
        "3d_lowres": {"data_identifier": "nnUNetPlans_3d_lowres", "batch_size": 2,
                      "patch_size": [80, 160, 160], "spacing": [1.7066, 1.2665, 1.2665],
                      "next_stage": "3d_cascade_fullres"},
        "3d_cascade_fullres": {"inherits_from": "3d_lowres", "previous_stage": "3d_lowres"},
    },
    "foreground_intensity_properties_per_channel": {"0": {"max": 1975.0, "mean": 312.30462646484375}},
}


@pytest.fixture
def pf(tmp_path):
    p = tmp_path / "nnUNetPlans.json"
    p.write_text(json.dumps(PLANS, indent=4))
    os.chmod(p, 0o640)
    return p


def test_read_follows_inherits_from(pf):
    assert read_batch_size(pf, "3d_lowres") == 2
    assert read_batch_size(pf, "3d_cascade_fullres") == 2


def test_set_on_the_configuration_itself_keeps_everything_else(pf):
    old, backup = set_batch_size(pf, "3d_cascade_fullres", 1)
    assert old == 2
    doc = json.loads(pf.read_text())
    assert doc["configurations"]["3d_cascade_fullres"]["batch_size"] == 1
    assert doc["configurations"]["3d_lowres"]["batch_size"] == 2  # the parent keeps its own
    # every other value identical, key order identical
    doc["configurations"]["3d_cascade_fullres"].pop("batch_size")
    assert doc == PLANS and list(doc) == list(PLANS)
    assert list(doc["configurations"]["3d_lowres"]) == list(PLANS["configurations"]["3d_lowres"])
    assert (pf.stat().st_mode & 0o777) == 0o640
    assert json.loads(backup.read_text()) == PLANS


def test_backup_is_made_once(pf):
    _, b = set_batch_size(pf, "3d_lowres", 1)
    set_batch_size(pf, "2d", 6)
    assert json.loads(b.read_text()) == PLANS  # still the original, not the intermediate
    assert sorted(x.name for x in pf.parent.iterdir()) == ["nnUNetPlans.json",
                                                          "nnUNetPlans.json" + plans.BACKUP_SUFFIX]


def test_crash_during_write_leaves_the_old_file(pf, monkeypatch):
    before = pf.read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt("supervisor killed mid-write")
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        set_batch_size(pf, "3d_lowres", 1)
    assert pf.read_bytes() == before
    assert not [x for x in pf.parent.iterdir() if x.name.endswith(".tmp")]


@pytest.mark.parametrize("content,conf,needle", [
    (None, "3d_lowres", "plans file not found"),
    ("{oops", "3d_lowres", "not valid JSON"),
    (json.dumps({"configurations": {}}), "3d_lowres", "key 'configurations.3d_lowres' not found"),
    (json.dumps({"configurations": {"x": {"batch_size": "2"}}}), "x",
     "key 'configurations.x.batch_size': expected an integer >= 1, got '2'"),
    (json.dumps({"configurations": {"x": {"batch_size": 2.5}}}), "x", "got 2.5"),
    (json.dumps({"configurations": {"x": {"inherits_from": "y"}}}), "x", "configurations.y"),
    (json.dumps({"plans": 1}), "x", "key 'configurations'"),
])
def test_bad_plans_name_file_and_key_and_stay_untouched(tmp_path, content, conf, needle):
    p = tmp_path / "nnUNetPlans.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(PlansError) as e:
        set_batch_size(p, conf, 1)
    assert needle in str(e.value) and str(p) in str(e.value)
    if content is not None:
        assert p.read_text() == content
    assert not (tmp_path / ("nnUNetPlans.json" + plans.BACKUP_SUFFIX)).exists()


def test_step_sequences():
    assert step_sequence(6, 1, "subtract", 1, 0.5) == [6, 5, 4, 3, 2, 1]
    assert step_sequence(6, 2, "subtract", 3, 0.5) == [6, 3, 2]
    assert step_sequence(6, 1, "multiply", 1, 0.5) == [6, 3, 1]
    assert step_sequence(4, 1, "multiply", 1, 0.9) == [4, 3, 2, 1]  # always makes progress
    assert next_batch_size(2, 2, "subtract", 1, 0.5) is None


# ---- run as root: the plans file belongs to the service user, and may be a link -------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
NOBODY = 65534


def owner(p):
    st = os.lstat(p)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


@needs_root
def test_step_down_as_root_keeps_owner_group_and_mode_of_plans_and_backup(pf):
    os.chown(pf, NOBODY, NOBODY)
    os.chmod(pf, 0o660)
    _, backup = set_batch_size(pf, "3d_lowres", 1)
    assert owner(pf) == (NOBODY, NOBODY, 0o660)
    assert owner(backup) == (NOBODY, NOBODY, 0o660)
    assert json.loads(backup.read_text()) == PLANS
    assert not [x for x in pf.parent.iterdir() if x.name.endswith(".tmp")]


@needs_root
def test_symlinked_plans_stay_a_link_and_the_target_is_written_atomically_in_its_folder(tmp_path):
    real_dir, link_dir = tmp_path / "shared", tmp_path / "pre"
    real_dir.mkdir()
    link_dir.mkdir()
    real = real_dir / "nnUNetPlans.json"
    real.write_text(json.dumps(PLANS, indent=4))
    os.chown(real, NOBODY, NOBODY)
    os.chmod(real, 0o640)
    link = link_dir / "nnUNetPlans.json"
    link.symlink_to(real)
    _, backup = set_batch_size(link, "3d_lowres", 1)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())["configurations"]["3d_lowres"]["batch_size"] == 1
    assert owner(real) == (NOBODY, NOBODY, 0o640)
    assert backup == link_dir / ("nnUNetPlans.json" + plans.BACKUP_SUFFIX)  # where the user looks
    assert not backup.is_symlink() and json.loads(backup.read_text()) == PLANS
    assert owner(backup) == (NOBODY, NOBODY, 0o640)
    assert sorted(os.listdir(real_dir)) == ["nnUNetPlans.json"]  # no temp left in either folder
    assert sorted(os.listdir(link_dir)) == sorted([link.name, backup.name])


def test_a_link_planted_as_the_backup_is_never_written_through(pf, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    backup = pf.with_name(pf.name + plans.BACKUP_SUFFIX)
    backup.symlink_to(victim)
    set_batch_size(pf, "3d_lowres", 1)
    assert victim.read_text() == "keep" and backup.is_symlink()


def test_a_dangling_link_planted_as_the_backup_creates_nothing(pf, tmp_path):
    backup = pf.with_name(pf.name + plans.BACKUP_SUFFIX)
    backup.symlink_to(tmp_path / "nowhere" / "new")
    (tmp_path / "nowhere").mkdir()
    set_batch_size(pf, "3d_lowres", 1)
    assert not (tmp_path / "nowhere" / "new").exists()


def test_a_step_down_never_raises_what_another_job_lowered(tmp_path):
    """Regression (review): queue folds share a plans file; a job that saw 6 must not write 5 over 4."""
    import json
    from supervisor.integrations.plans import lower_batch_size, read_batch_size
    p = tmp_path / "nnUNetPlans.json"
    p.write_text(json.dumps({"configurations": {"3d_fullres": {"batch_size": 4}}}, indent=4))
    before = p.read_bytes()
    assert lower_batch_size(p, "3d_fullres", 5) == (4, 4, None)
    assert p.read_bytes() == before and not p.with_name(p.name + ".cardiacseg-backup").exists()
    old, new, backup = lower_batch_size(p, "3d_fullres", 3)
    assert (old, new) == (4, 3) and read_batch_size(p, "3d_fullres") == 3 and backup.exists()

