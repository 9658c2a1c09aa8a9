"""Compilers for accelerators that are not on this machine, installed on first use into a cache
folder of their own (never into the environment that runs the tests: a CUDA plugin or libtpu found
there would change which backend JAX starts).

- ``cuda()``: JAX's CUDA PJRT plugin and its Mosaic GPU runtime (``jax-cuda13-pjrt``,
  ``jax-cuda13-plugin``), ``ptxas`` (``nvidia-cuda-nvcc``) and libdevice (``nvidia-nvvm``); about
  730 MB, in ``$OSDN_CUDA_TOOLCHAIN`` (default ``~/.cache/osdn-jax/cuda-toolchain``).
- ``tpu()``: ``libtpu`` (about 220 MB) in ``$OSDN_TPU_TOOLCHAIN`` (default
  ``~/.cache/osdn-jax/tpu-toolchain``).

Each returns the folder; its ``site`` holds the packages (``pip install --target``), to be put on
``PYTHONPATH`` of a child process that runs with ``JAX_PLATFORMS=cpu``. A failed install raises
``ToolchainError`` with pip's last words.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pathlib
import platform
import subprocess
import sys

CUDA = ("jax-cuda13-pjrt==0.11.2", "jax-cuda13-plugin==0.11.2", "nvidia-cuda-nvcc==13.5.37", "nvidia-nvvm==13.5.37")
TPU = ("libtpu==0.0.48.1",)  # the libtpu that jax 0.11.2's `jax[tpu]` extra takes


class ToolchainError(RuntimeError):
    """The toolchain could not be installed here."""


def _install(root: pathlib.Path, packages: tuple[str, ...], what: str) -> pathlib.Path:
    marker = root / ("installed-" + hashlib.sha256(" ".join(packages).encode()).hexdigest()[:12])
    if marker.exists():
        return root
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ToolchainError(f"the {what} toolchain ({', '.join(packages)}) has wheels for x86-64 Linux only, "
                             f"not {sys.platform} {platform.machine()}")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # two processes installing at once wait for each other
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return root
        print(f"installing the {what} toolchain into {root} ({', '.join(packages)}) ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                               "--target", str(root / "site"), *packages], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ToolchainError(f"pip could not install the {what} toolchain into {root}: " + " / ".join(tail))
        marker.touch()
    return root


def cuda() -> pathlib.Path:
    """The CUDA compile toolchain's folder (installed on first use)."""
    default = pathlib.Path.home() / ".cache/osdn-jax/cuda-toolchain"
    return _install(pathlib.Path(os.environ.get("OSDN_CUDA_TOOLCHAIN", default)), CUDA, "CUDA")


def tpu() -> pathlib.Path:
    """The TPU compile toolchain's folder (installed on first use)."""
    default = pathlib.Path.home() / ".cache/osdn-jax/tpu-toolchain"
    return _install(pathlib.Path(os.environ.get("OSDN_TPU_TOOLCHAIN", default)), TPU, "TPU")
