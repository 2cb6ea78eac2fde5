"""The thermal guard: GPU temperatures in, a verdict out (a pure function), and the two sensor sources.

How it works
- This module only measures. What a reading means (pause, resume, stop, cooled) is decided by the
  policy (rules.thermal_verdict) from the config in force, so a reload's new limits apply at once.
- `ThermalGuard` opens the configured source at start-up (a guard that cannot read anything is a
  configuration error, exit 2), turns each poll into a Readings event for the decision function,
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

from supervisor.config.loader import Config, ConfigError
from supervisor.core.events import Readings
from supervisor.integrations import proc
from supervisor.integrations.nvml import Nvml, Reading
from supervisor.integrations.store import atomic_write


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
                self.proc = proc.popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
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
            proc.release(self.proc)
            self.proc = None
            return self._failed(f"{self.argv[0]} did not answer within {self.timeout_s:g} s")
        out, _ = self.proc.communicate()
        proc.release(self.proc)
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
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()
            proc.release(self.proc)
            self.proc = None


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
        idx, why = nvml.training_gpus(cfg)
        if why:
            raise ConfigError(cfg.path, [why])
        return cls(cfg, NvmlSource(nvml, idx, cfg.thermal.poll_seconds), log)

    def configure(self, cfg: Config) -> None:
        """A reload: the thresholds are read from `cfg` by the policy; the pace and the sensor command's
        timeout (declared live) are the source's own, so they are set here, in force from the next poll."""
        self.cfg = cfg
        self.source.poll_s = cfg.thermal.poll_seconds
        if isinstance(self.source, CommandSource):
            self.source.timeout_s = cfg.thermal.command_timeout_seconds
        self.source.next = 0.0  # the next poll comes at once, then at the new pace

    @property
    def pid(self) -> int | None:
        return getattr(self.source, "pid", None)

    def poll(self, now: float, state_dir: Path) -> Readings | None:
        res = self.source.poll(now)
        if res is None:
            return None
        readings, err = res
        if err != self.error:  # say it once, not every poll
            (self.log.warning("sensor_read_failed", error=err) if err else self.log.info("sensor_ok"))
            self.error = err
        try:
            # not durable (no fsync): rewritten every poll for `status`, worthless after a crash
            atomic_write(state_dir / "thermal.json", json.dumps({
                "at": time.time(), "readings": [r.to_json() for r in readings], "error": err}).encode(),
                durable=False)
        except OSError:
            pass  # status shows the last readings it has; supervision goes on
        return Readings(temps=tuple((r.gpu, r.celsius) for r in readings),
                        lost=tuple(r.gpu for r in readings if r.lost), error=err)

    def close(self) -> None:
        if isinstance(self.source, CommandSource):
            self.source.close()
