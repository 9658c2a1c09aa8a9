"""``--profile.steps A:B``: a ``jax.profiler`` trace of training steps A to B (1-based, the steps of
``metrics.jsonl``) in ``<run_dir>/profile/`` (another process than 0: ``profile/process-<i>/``).

JAX writes ``plugins/profile/<date>_<time>/<host>.xplane.pb`` (TensorBoard's profile plugin, xprof)
and ``<host>.trace.json.gz`` (a Chrome trace: https://ui.perfetto.dev) there. The trace starts
before step A is dispatched and stops once step B's outputs are ready; a run that ends or stops
inside the window (``run_steps``, SIGTERM, an error) stops it too (``close``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

PROFILE_DIR = "profile"


def profile_dir(run_dir: str | Path, process_index: int = 0) -> Path:
    """Where this process's traces go: ``<run_dir>/profile`` (process 0) or ``.../process-<i>``."""
    base = Path(run_dir) / PROFILE_DIR
    return base if process_index == 0 else base / f"process-{process_index}"


class StepProfiler:
    """Starts and stops ``jax.profiler`` around the steps of ``window`` (``(A, B)``, or None: never).

    The step loop calls ``before_step(step)`` before dispatching step ``step`` and
    ``after_step(step, outputs)`` after it, and ``close()`` at the end of the run (also on failure).
    """

    def __init__(self, window: tuple[int, int] | None, log_dir: str | Path):
        self.window, self.log_dir = window, Path(log_dir)
        self.active, self._before = False, set()
        self.trace_dir: Path | None = None  # the trace written (plugins/profile/<date>_<time>), once stopped

    def check(self, first_step: int, last_step: int) -> str | None:
        """A warning when none of the window falls in the steps ``first_step + 1 .. last_step`` that
        this invocation may run (e.g. a resumed run past it), else None."""
        if self.window is None:
            return None
        a, b = self.window
        if b <= first_step or a > last_step:
            return f"profile.steps {a}:{b}: no trace, this invocation runs steps {first_step + 1} to {last_step}"
        return None

    def before_step(self, step: int) -> None:
        if self.window is None or self.active or self.trace_dir is not None:
            return
        a, b = self.window
        if a <= step <= b:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._before = set(self._traces())
            jax.profiler.start_trace(str(self.log_dir))
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)  # the device work of the last step is in the trace
            self._stop()

    def close(self) -> None:
        """Stops a trace still running (the run ended or failed inside the window)."""
        if self.active:
            try:
                self._stop()
            except Exception as e:  # never hide the error that ended the run
                print(f"warning: profile: stopping the trace failed ({e})", file=sys.stderr)

    def _traces(self) -> list[Path]:
        return sorted((self.log_dir / "plugins" / "profile").glob("*"))

    def _stop(self) -> None:
        self.active = False
        jax.profiler.stop_trace()
        new = [p for p in self._traces() if p not in self._before]
        self.trace_dir = new[-1] if new else self.log_dir


__all__ = ["PROFILE_DIR", "StepProfiler", "profile_dir"]
