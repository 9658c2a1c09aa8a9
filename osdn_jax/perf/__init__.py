"""Predicted speed of compiled programs: read XLA's optimized HLO into kernels (``hlo``), count the
FLOPs inside Pallas calls (``pallas``), and turn both into a roofline time on a chip (``roofline``,
with the chip table in ``osdn_jax.hardware``). ``benchmarks/aot.py`` compiles for GPUs and TPUs that
are not there and prints the tables; ``benchmarks/gpu_suite.py`` prints the prediction beside each
measured time."""

from osdn_jax.perf.hlo import Kernel, Program
from osdn_jax.perf.roofline import Roofline, analyze, label, roofline

__all__ = ["Kernel", "Program", "Roofline", "analyze", "label", "roofline"]
