"""Exit classification: real-looking nnU-Net stderr, exit codes, and who sent the signal."""
import signal
from pathlib import Path

import pytest

from supervisor.classify import Exit, Reason, classify

FIX = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("fixture,rc,expected", [
    # captured from real nnU-Net 2.8.1 on this machine (the OOM raised by the demo OOM trainer):
    ("real_nnunet_oom_sigabrt.txt", -signal.SIGABRT, Reason.CUDA_OOM),
    ("oom_exit1.txt", 1, Reason.CUDA_OOM),
    ("oom_abort.txt", -signal.SIGABRT, Reason.CUDA_OOM),   # same OOM, death by SIGABRT
    ("cublas.txt", 1, Reason.CUDA_OOM),
    ("host_oom.txt", 1, Reason.HOST_OOM),
    ("corrupt_checkpoint.txt", 1, Reason.CORRUPT_CHECKPOINT),
    ("missing_trainer.txt", 1, Reason.CONFIG_ERROR),
    ("missing_plans.txt", 1, Reason.CONFIG_ERROR),
    ("plain_crash.txt", 1, Reason.CRASH),
])
def test_stderr_evidence(fixture, rc, expected):
    assert classify(Exit(returncode=rc, stderr_tail=(FIX / fixture).read_text())) == expected


def test_clean_finish_needs_final_checkpoint():
    assert classify(Exit(0, final_checkpoint=True)) == Reason.COMPLETED
    # exit 0 without checkpoint_final.pth (a custom script that gave up early) is not "completed"
    assert classify(Exit(0, final_checkpoint=False)) == Reason.CRASH


def test_sigkill_nobody_sent_is_host_oom_unless_cgroup_says_otherwise():
    assert classify(Exit(-signal.SIGKILL)) == Reason.HOST_OOM
    assert classify(Exit(-signal.SIGKILL, oom_kills_delta=1)) == Reason.HOST_OOM
    assert classify(Exit(-signal.SIGKILL, oom_kills_delta=0)) == Reason.CRASH
    assert classify(Exit(-signal.SIGKILL, we_killed=True)) == Reason.CRASH


def test_our_own_stop_wins_over_the_evidence():
    # the trainer dies with a KeyboardInterrupt traceback and -2 after OUR SIGINT
    tb = "Traceback (most recent call last):\nKeyboardInterrupt\n"
    assert classify(Exit(-signal.SIGINT, tb, stop_intent="target")) == Reason.TARGET_REACHED
    assert classify(Exit(-signal.SIGKILL, tb, stop_intent="operator", we_killed=True)) == Reason.STOPPED


def test_config_error_beats_oom_text_in_the_same_tail():
    text = (FIX / "missing_trainer.txt").read_text() + "\nCUDA out of memory\n"
    assert classify(Exit(1, text)) == Reason.CONFIG_ERROR


def test_out_of_memory_error_is_not_taken_for_host_memory_error():
    assert classify(Exit(1, "torch.OutOfMemoryError: CUDA out of memory.")) == Reason.CUDA_OOM
    assert classify(Exit(1, "MemoryError\n")) == Reason.HOST_OOM
