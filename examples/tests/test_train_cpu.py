"""The training program's CPU adaptations: the thread tuner picks the faster thread count
from timed steps (and follows a change of load), native-bf16 detection, and the default
run's configuration (channels_last, bf16 where native, tuned threads)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")
from minc_train import cpu  # noqa: E402


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_thread_tuner_picks_the_faster_and_follows_the_load(monkeypatch, restore_threads):
    # a fake clock: each step takes cost[threads] seconds
    clock = {"t": 0.0}
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock["t"])
    cost = {2: 1.0, 1: 1.8}  # idle machine: 2 threads faster
    tuner = cpu.ThreadTuner(2, period=10, trial=2)
    used = []
    for i in range(50):
        if i == 12:
            cost = {2: 5.0, 1: 1.8}  # another process takes a core: 1 thread faster
        tuner.before_step()
        n = torch.get_num_threads()
        used.append(n)
        clock["t"] += cost[n]
        tuner.after_step()
    # step 0 is the untimed warm-up with 2 threads; steps 1-4 alternate 2, 1, 2, 1
    assert used[:5] == [2, 2, 1, 2, 1]
    # 2 threads won and were already the choice: the gap to the next trial doubles (20)
    assert tuner.history[0] == (5, 2)
    assert used[5:25] == [2] * 20
    # that trial sees the load that changed at step 12: 1 thread is more than twice as fast
    # after one step of each (25, 26), so the trial ends there and the gap goes back to the
    # period (10)
    assert used[25:27] == [2, 1] and tuner.history[1] == (27, 1)
    assert used[27:37] == [1] * 10
    assert used[37:39] == [2, 1] and tuner.history[2] == (39, 1)
    assert used[39:50] == [1] * 11
    assert tuner.settle() == 1 and torch.get_num_threads() == 1


def test_thread_tuner_one_core_is_inactive(restore_threads):
    tuner = cpu.ThreadTuner(1)
    assert not tuner.active
    tuner.before_step()
    tuner.after_step()
    assert tuner.settle() == 1
    with pytest.raises(ValueError, match="max_threads"):
        cpu.ThreadTuner(0)


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert cpu.native_bf16()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not cpu.native_bf16()
