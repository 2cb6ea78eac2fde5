"""The thermal guard: GPU temperatures in, a verdict out (a pure function), and the two sensor sources.

How it works
- `verdict(state, readings, now, cfg, paused_at, failed_reads, num_gpus)` looks at one poll of the
  watched GPUs and returns what should happen: "pause" (any GPU above pause_celsius: SIGSTOP the whole
  process group), "resume" (paused, and every GPU known and at or below resume_celsius: hysteresis),
  "stop_hot" (any GPU at or above stop_celsius, or a pause of a multi-GPU run, where NCCL would time out
  after 10 minutes), "stop_pause" (paused longer than max_pause_minutes), "stop_sensor" (max_failed_reads
  polls in a row without a reading for every GPU), "gpu_lost" (NVML says the GPU fell off the bus), or
  "cooled" (after a thermal stop, every GPU known and at or below resume_celsius: restart). An unknown
  reading never resumes or restarts anything.
- `ThermalGuard` opens the configured source at start-up (a guard that cannot read anything is a
  configuration error, exit 2), turns each poll into a Temperatures event for the decision function,
  says a read failure once (not every poll), and writes the readings to <state_dir>/thermal.json for
  `status` (which takes the limits from the config in force).
- Sources are polled from the main loop and never block it. `NvmlSource` reads NVML (fast). `CommandSource`
  starts the configured program every poll_seconds and collects its output on a later turn: one line per
  GPU, `<index> <celsius>`; a program that is missing, exits non-zero, prints anything else, or outlives
  command_timeout_seconds yields a failed read (all GPUs unknown) and a warning.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from . import job
from .config import Config, ConfigError
from .events import Temperatures
from .gpu import Nvml, Reading
from .store import atomic_write

ACTIVE = ("running", "stop_pending", "paused")


def verdict(state: str, readings: list[Reading], now: float, cfg, paused_at: float | None,
            failed_reads: int, num_gpus: int = 1) -> str | None:
    known = [r.celsius for r in readings if r.celsius is not None]
    complete = bool(readings) and len(known) == len(readings)
    if any(r.lost for r in readings) and state in ACTIVE:
        return "gpu_lost"
    if state == "cooling":
        return "cooled" if complete and max(known) <= cfg.thermal.resume_celsius else None
    if state not in ACTIVE:
        return None
    if known and max(known) >= cfg.thermal.stop_celsius:
        return "stop_hot"
    if failed_reads >= cfg.thermal.max_failed_reads:
        return "stop_sensor"
    if state == "paused":
        if complete and max(known) <= cfg.thermal.resume_celsius:
            return "resume"
        if paused_at is not None and now - paused_at > cfg.thermal.max_pause_minutes * 60:
            return "stop_pause"
        return None
    if known and max(known) > cfg.thermal.pause_celsius:
        return "stop_hot" if num_gpus > 1 else "pause"
    return None


class NvmlSource:
    def __init__(self, nvml: Nvml, indices: list[int], poll_s: float):
        self.nvml, self.indices, self.poll_s = nvml, indices, poll_s
        self.next = 0.0

    def poll(self, now: float):
        if now < self.next:
            return None
        self.next = now + self.poll_s
        return [self.nvml.read(i) for i in self.indices], None


def parse_command_output(text: str, gpus: list[str] | None) -> tuple[list[Reading], str | None]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            idx, c = parts[0], float(parts[1])
            int(idx)
        except ValueError:
            return [], f"unexpected line {line.strip()[:80]!r} (expected '<index> <celsius>')"
        found[idx] = c
    names = gpus or sorted(found, key=int)
    if not names:
        return [], "no readings"
    return [Reading(gpu=g, celsius=found.get(g)) for g in names], None


class CommandSource:
    def __init__(self, argv: list[str], timeout_s: float, poll_s: float, gpus: list[str] | None):
        self.argv, self.timeout_s, self.poll_s, self.gpus = argv, timeout_s, poll_s, gpus
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.next = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _failed(self, why: str):
        return [Reading(gpu=g) for g in (self.gpus or [])], why

    def poll(self, now: float):
        if self.proc is None:
            if now < self.next:
                return None
            self.next = now + self.poll_s
            try:
                self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                             stdin=subprocess.DEVNULL, text=True, start_new_session=True)
            except OSError as e:
                return self._failed(f"cannot run {self.argv[0]}: {e.strerror or e}")
            self.started = now
            return None
        if self.proc.poll() is None:
            if now - self.started <= self.timeout_s:
                return None
            self.proc.kill()
            self.proc.communicate()
            self.proc = None
            return self._failed(f"{self.argv[0]} did not answer within {self.timeout_s:g} s")
        out, _ = self.proc.communicate()
        rc, self.proc = self.proc.returncode, None
        if rc != 0:
            return self._failed(f"{self.argv[0]} exited with {rc}")
        readings, err = parse_command_output(out, self.gpus)
        return (readings, None) if err is None else self._failed(err)

    def read_once(self) -> tuple[list[Reading], str | None]:
        """Blocking read for start-up validation (bounded by the timeout)."""
        self.next = 0.0
        deadline = time.monotonic() + self.timeout_s + 1
        while time.monotonic() < deadline:
            res = self.poll(time.monotonic())
            if res is not None:
                return res
            time.sleep(0.02)
        return self._failed("no answer")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


class ThermalGuard:
    def __init__(self, cfg: Config, source, log):
        self.cfg, self.source, self.log = cfg, source, log
        self.error: str | None = None

    @classmethod
    def open(cls, cfg: Config, nvml: Nvml | None, log) -> "ThermalGuard | None":
        if not cfg.thermal.enabled:
            return None
        if cfg.thermal.source == "command":
            src = CommandSource(list(cfg.thermal.command), cfg.thermal.command_timeout_seconds, cfg.thermal.poll_seconds,
                                list(cfg.thermal.gpus) or None)
            readings, err = src.read_once()
            if err or not readings or any(r.celsius is None for r in readings):
                raise ConfigError(cfg.path, [f"thermal.command: {err or 'no reading for every GPU'} "
                                             f"(running {list(cfg.thermal.command)})"])
            return cls(cfg, src, log)
        if nvml is None:
            raise ConfigError(cfg.path, [f"thermal.enabled: NVML is not available ({Nvml.open_error()}); "
                                         "install the NVIDIA driver, or set [thermal] enabled = false, "
                                         'or source = "command"'])
        if cfg.thermal.gpus:
            bad = [g for g in cfg.thermal.gpus if not g.isdigit() or int(g) >= nvml.count]
            if bad:
                raise ConfigError(cfg.path, [f"thermal.gpus: {bad} are not NVML indices 0..{nvml.count - 1}"])
            idx = [int(g) for g in cfg.thermal.gpus]
        else:
            idx, why = nvml.select(job.build_env(cfg).get("CUDA_VISIBLE_DEVICES"), cfg.training.num_gpus)
            if why or not idx:
                raise ConfigError(cfg.path, [f"thermal.gpus: {why or 'no GPU found'}; list them explicitly"])
        return cls(cfg, NvmlSource(nvml, idx, cfg.thermal.poll_seconds), log)

    @property
    def pid(self) -> int | None:
        return getattr(self.source, "pid", None)

    def poll(self, now: float, sup, state_dir: Path) -> Temperatures | None:
        res = self.source.poll(now)
        if res is None:
            return None
        readings, err = res
        if err != self.error:  # say it once, not every poll
            (self.log.warning("sensor_read_failed", error=err) if err else self.log.info("sensor_ok"))
            self.error = err
        failed = err is not None or not readings or any(r.celsius is None for r in readings)
        v = verdict(sup.state.value, readings, now, self.cfg, sup.paused_at,
                    sup.failed_reads + (1 if failed else 0), self.cfg.training.num_gpus)
        try:
            atomic_write(state_dir / "thermal.json", json.dumps({
                "at": now, "readings": [r.to_json() for r in readings], "error": err}).encode())
        except OSError:
            pass
        return Temperatures(v, {r.gpu: r.celsius for r in readings}, failed)

    def close(self) -> None:
        if isinstance(self.source, CommandSource):
            self.source.close()
