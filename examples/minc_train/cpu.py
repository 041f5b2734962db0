"""What the CPU path of the training program adapts to: native bf16 support and the number
of threads that is fastest on a machine that other processes may be sharing."""
from __future__ import annotations

import os
import statistics
import time

import torch

# CPU flags with bf16 dot products in hardware (oneDNN runs bf16 convolutions and matmuls
# on them at about twice the fp32 rate; without them bf16 is emulated and no faster).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """True if this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & set(NATIVE_BF16_FLAGS))


class ThreadTuner:
    """Picks the torch thread count of the training steps by timing them.

    On idle cores ``max_threads`` threads are fastest; when other processes hold cores,
    threads that meet at barriers wait for each other's time slices and 2 threads can be
    several times slower than 1.  So from time to time ``2 * trial`` steps alternate between
    ``max_threads`` and 1 thread, and the following steps run with the one whose median step
    time was lower (a trial ends early when one option is more than twice as fast).  The first trial follows the run's first (untimed, warm-up) step; the
    next comes ``period`` steps after a trial, and the gap doubles (up to ``8 * period``)
    while the choice stays the same, so a steady machine pays for few trials.

    The choice follows the machine's load, and the reduction order of oneDNN's convolutions
    depends on the thread count, so runs with the tuner are not bit-exact from one run to
    the next; pass a fixed ``--threads`` for that.
    """

    def __init__(self, max_threads: int, period: int = 39, trial: int = 2):
        if max_threads < 1 or period < 1 or trial < 1:
            raise ValueError(f"need max_threads, period and trial >= 1, got {max_threads}, {period}, "
                             f"{trial}")
        self.options = (max_threads, 1) if max_threads > 1 else (1,)
        self.period, self.trial = period, trial
        self.chosen = self.options[0]
        self.calls = 0
        self.history: list[tuple[int, int]] = []  # (steps done, threads chosen) at each decision
        self._gap = period
        self._trial_start = 1  # step index where the next trial begins (step 0 warms up)
        self._times: dict[int, list[float]] = {o: [] for o in self.options}
        self._t0 = 0.0
        self._current = None  # set on the first step

    @property
    def active(self) -> bool:
        return len(self.options) > 1

    def _trial_index(self) -> int:
        """Position of this step in the current trial, or -1 outside a trial."""
        i = self.calls - self._trial_start
        return i if 0 <= i < self.trial * len(self.options) else -1

    def _use(self, threads: int) -> None:
        if threads != self._current:
            torch.set_num_threads(threads)
            self._current = threads

    def before_step(self) -> None:
        """Set the thread count of the next step (a trial option or the current choice)."""
        if not self.active:
            return
        i = self._trial_index()
        self._use(self.options[i % len(self.options)] if i >= 0 else self.chosen)
        self._t0 = time.perf_counter()

    def after_step(self) -> None:
        """Record the step's wall time (CPU ops are synchronous); decide at a trial's end."""
        if not self.active:
            return
        dt = time.perf_counter() - self._t0
        i = self._trial_index()
        if i >= 0:
            self._times[self._current].append(dt)
            t = self._times
            # a clear verdict (every option timed, the slowest step of one under half the
            # fastest of the other) ends the trial early: on a busy machine a trial step
            # with all cores can take several times a 1-thread step
            clear = all(t.values()) and max(max(v) for v in t.values()) > 0 and any(
                2 * max(t[a]) < min(t[b]) for a in self.options for b in self.options if a != b)
            if clear or i == self.trial * len(self.options) - 1:
                best = min(self.options, key=lambda o: statistics.median(self._times[o]))
                self._gap = min(2 * self._gap, 8 * self.period) if best == self.chosen else self.period
                self.chosen = best
                self.history.append((self.calls + 1, best))
                self._times = {o: [] for o in self.options}
                self._trial_start = self.calls + 1 + self._gap
        self.calls += 1

    def settle(self) -> int:
        """Use the current choice (e.g. for evaluation between epochs); returns it."""
        if self.active:
            self._use(self.chosen)
        return self.chosen if self.active else torch.get_num_threads()


def default_threads() -> int:
    """The cores this process may run on (affinity mask), else torch's default."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return torch.get_num_threads()
