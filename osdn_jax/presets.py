"""Named OSDN hyper-parameter presets (SPEC §3).

APF is not part of a preset: both presets were run with and without it, so it is a separate switch
(``apf=True`` on the layer, or ``log_gamma`` on the op).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OSDNPreset:
    """Step size, initial value and clip range of the online preconditioner ``d``."""

    name: str
    eta: float  # hypergradient step η
    d0_init: float  # initial value of the learnable d0 [H, K]
    d_min: float
    d_max: float


PRESETS: dict[str, OSDNPreset] = {
    # Paper runs (1.3B, and the 340M table rows). The 340M run without APF clipped to [0, 2].
    "apr": OSDNPreset("apr", eta=1.0, d0_init=0.0, d_min=0.0, d_max=1e9),
    # Later re-runs (ablation).
    "may": OSDNPreset("may", eta=0.003, d0_init=1.0, d_min=2.0 / 3.0, d_max=1.5),
    # Not from the paper: 'apr' with d0 = 1, for short documents and retrieval prompts. With d0 = 0 a
    # document's first writes are near zero (⟨d, k²⟩ grows about as t / K), which is where MQAR puts
    # its key-value pairs; d0 = 1 writes at DeltaNet's full strength from the first token (docs/mqar.md).
    "apr-d1": OSDNPreset("apr-d1", eta=1.0, d0_init=1.0, d_min=0.0, d_max=1e9),
}


def get_preset(name: str) -> OSDNPreset:
    """The preset called ``name``; a ``ValueError`` lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown OSDN preset {name!r}; expected one of {sorted(PRESETS)}") from None
