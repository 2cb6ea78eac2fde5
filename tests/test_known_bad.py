"""Known-bad versions (issue 23 item 5): the table judges what the trainer's environment has, each finding
with its fix; nnunetv2's own requirement is read from its metadata, never hard-coded; careless version
strings ('2.9.0+cu128', '2.6.0a0+git...', garbage, a missing package) are judged, never a crash."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from supervisor.core import known_bad as kb
from supervisor.integrations.checkpoints import read_checkpoint

HERE = Path(__file__).parent
REQ_281 = ("torch!=2.9.*,>=2.1.2", "numpy>=1.24", 'torch<2.3; extra == "intel-macos"')  # nnunetv2 2.8.1's


@pytest.mark.parametrize("text,release", [
    ("2.9.0+cu128", (2, 9, 0)), ("2.6.0a0+gitecf3bae", (2, 6, 0)), ("2.10.1", (2, 10, 1)), ("v2.5", (2, 5)),
    ("1.26.4", (1, 26, 4)), ("", None), ("garbage", None), (None, None), (3, None)])
def test_release_reads_what_pip_and_containers_write(text, release):
    assert kb.release(text) == release


@pytest.mark.parametrize("version,ok", [
    ("2.9.0", False), ("2.9.1+cu128", False), ("2.9.0a0+git", False), ("2.8.0", True), ("2.10.0", True),
    ("2.1.2", True), ("2.1.1", False), ("2.14.1+cu130", True)])
def test_nnunetvs_own_torch_requirement_is_evaluated(version, ok):
    clauses = kb.torch_requirement(REQ_281)
    assert clauses == (("!=", "2.9.*"), (">=", "2.1.2"))  # the marker line (an extra) is not taken
    assert kb.allows(clauses, version) is ok


def test_requirement_forms():
    assert kb.requirement("torch (>=2.1.2)") == ("torch", ((">=", "2.1.2"),), "")
    assert kb.requirement("Torch_X[cuda]~=2.1; python_version<'3.12'")[0] == "torch-x"
    assert kb.requirement("not a requirement !!") is None
    assert kb.allows((("~=", "2.1"),), "2.5.0") and not kb.allows((("~=", "2.1.0"),), "2.2.0")
    assert kb.allows((("===", "2.1"),), "2.1") is None and kb.allows((("!=", "2.9.*"),), "junk") is None


def rules(v, **kw):
    return {f.rule: f for f in kb.judge(v, **kw)}


def test_the_current_combination_is_fine():
    v = kb.Versions(nnunetv2="2.8.1", torch="2.14.1", numpy="2.4.6", torch_cuda="13.0", nnunetv2_requires=REQ_281,
                    driver_cuda=13000)
    assert kb.judge(v) == []


def test_torch_2_9_excluded_by_nnunetv2_is_fatal_for_3d_on_cuda_with_the_fix():
    v = kb.Versions(nnunetv2="2.8.1", torch="2.9.0+cu128", nnunetv2_requires=REQ_281)
    f = rules(v)["torch_excluded"]
    assert f.fatal and "excluded by nnunetv2 2.8.1's own requirement (torch!=2.9.*,>=2.1.2)" in f.text
    assert "4x slower" in f.text and "pip install 'torch!=2.9.*,>=2.1.2'" in f.text
    # 2d, or not on CUDA (no mixed precision there): said, not fatal
    assert rules(v, three_d=False)["torch_excluded"].level == "warning"
    assert rules(v, device="cpu")["torch_excluded"].level == "warning"


def test_torch_2_9_under_an_older_nnunetv2_that_allows_it_is_still_known_bad():
    v = kb.Versions(nnunetv2="2.6.2", torch="2.9.1", nnunetv2_requires=("torch>=2.1.2",))
    f = rules(v)["torch_excluded"]
    assert f.fatal and "known-bad series" in f.text and "pip install 'torch!=2.9.*'" in f.text


def test_a_requirement_that_excludes_an_unknown_series_is_fatal_without_a_made_up_reason():
    v = kb.Versions(nnunetv2="3.0", torch="3.1.0", nnunetv2_requires=("torch!=3.1.*",))
    f = rules(v)["torch_excluded"]
    assert f.fatal and "nnU-Net's developers exclude it" in f.text


@pytest.mark.parametrize("nnunetv2,torch,bad", [
    ("2.5.1", "2.6.0", True), ("2.5.2", "2.6.0+cu124", True),    # 2.5.2 fixed nnUNetv2_predict only
    ("2.5.2", "2.6.0a0+ecf3bae40a", True),                         # NVIDIA's container torch: 2.6 behaviour
    ("2.6.0", "2.6.0", False), ("2.5.1", "2.5.1", False), ("2.8.1", "2.14.1", False)])
def test_weights_only_nnunetv2_before_2_6_with_torch_2_6_or_newer(nnunetv2, torch, bad):
    f = rules(kb.Versions(nnunetv2=nnunetv2, torch=torch)).get("weights_only")
    assert (f is not None) == bad
    if f:
        assert f.fatal and "pip install 'nnunetv2>=2.6'" in f.text and "Weights only load failed" in f.text


def test_a_numpy2_checkpoint_under_numpy1_names_the_checkpoint_and_the_fix():
    # a checkpoint really written by torch 2.14.1 under numpy 2.4.6 (tests/fixtures/checkpoint_numpy2.pth)
    info = read_checkpoint(HERE / "fixtures" / "checkpoint_numpy2.pth")
    assert info["numpy2_pickle"] and info["epoch"] == 4
    v = kb.Versions(numpy="1.26.4", checkpoint="fold_0/checkpoint_latest.pth", checkpoint_numpy2=True)
    f = rules(v)["numpy2_checkpoint"]
    assert f.fatal and "fold_0/checkpoint_latest.pth" in f.text and "pip install 'numpy>=2'" in f.text
    assert kb.judge(dataclasses.replace(v, numpy="2.0.0")) == []
    assert kb.judge(dataclasses.replace(v, checkpoint_numpy2=False)) == []


def test_the_driver_rule_is_the_one_check_used_and_only_for_cuda():
    v = kb.Versions(torch="2.14.1", torch_cuda="13.0", driver_cuda=12020)
    assert rules(v)["driver_cuda"].fatal
    assert "driver_cuda" not in rules(v, device="cpu")


def test_missing_packages_and_garbage_are_not_judged_nor_crash():
    assert kb.judge(kb.Versions()) == []
    assert kb.judge(kb.Versions(nnunetv2="garbage", torch="", numpy=None, nnunetv2_requires=("!!",))) == []
    assert kb.describe(kb.Versions()) == "nnunetv2 not installed, torch not installed, numpy not installed"


@pytest.mark.parametrize("version,unpacks", [("2.5.2", True), ("2.4.0", True), ("2.6.0", False), ("2.8.1", False),
                                             ("2.6.0a0", False), (None, True), ("garbage", True)])
def test_which_nnunetv2_unpacks_at_start(version, unpacks):
    assert kb.unpacks_at_start(version) is unpacks
