"""The paper's training runs as named recipes (SPEC §3, §5): ``python -m osdn_jax.train --recipe
osdn-340m --data.source shards --data.path DIR``, DIR made once by ``python -m osdn_jax.train.prepare
fineweb-edu/ --out DIR --tokenizer bpe --bpe-vocab-size 32000`` (docs/data.md).

A recipe is a whole ``TrainConfig``: the model preset of the same name, bf16 compute, context 4096,
AdamW at lr 1e-3 with warmup 1024 (340M) / 2048 (1.3B) steps and cosine decay to 0.1×, gradient
clip 1.0, weight decay 0.1, seed 42. Command-line flags still override any field.

Where the paper is silent the recipe says what it assumes: 0.5M tokens per step (128 rows of
4096; the DeltaNet / Gated DeltaNet papers' batch at these sizes), hence 19,073 steps for the
10B-token 340M runs and 190,734 for the 100B-token 1.3B runs; a 32,000-token BPE trained on the
data (the paper's vocabulary size; pass ``--data.tokenizer-path`` for a specific tokenizer). The
corpus (FineWeb-Edu 10B / 100B) is the user's to give: ``--data.source`` and ``--data.path`` (a
prepared folder brings its own tokenizer, which must be a BPE here or ``--data.tokenizer`` changes).
"""

from __future__ import annotations

from osdn_jax.train.config import CheckpointConfig, ModelSettings, OptimConfig, TrainConfig
from osdn_jax.train.data import DataConfig

TOKENS_PER_STEP = 128 * 4096
_SIZE = {"340m": dict(tokens=10e9, warmup=1024), "1.3b": dict(tokens=100e9, warmup=2048)}
_MODELS = ("osdn", "osdn-apf", "deltanet", "gdn")


def paper_recipe(model_preset: str, tokens: float, warmup: int) -> TrainConfig:
    """The paper's optimisation settings around ``model_preset`` for a ``tokens``-token run."""
    return TrainConfig(
        run_dir=f"runs/{model_preset}",
        steps=int(tokens // TOKENS_PER_STEP),
        seed=42,
        model=ModelSettings(preset=model_preset, compute_dtype="bfloat16"),
        data=DataConfig(seq_len=4096, batch_size=TOKENS_PER_STEP // 4096, tokenizer="bpe", bpe_vocab_size=32000),
        optim=OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=warmup, weight_decay=0.1, grad_clip=1.0),
        checkpoint=CheckpointConfig(every=1000),
        eval_every=1000,
        sample_prompt="The",
    )


RECIPES: dict[str, TrainConfig] = {
    f"{model}-{size}": paper_recipe(f"{model}-{size}", **spec) for size, spec in _SIZE.items() for model in _MODELS
}


def get_recipe(name: str) -> TrainConfig:
    """The recipe called ``name``; a ``ValueError`` lists the known names otherwise."""
    if name not in RECIPES:
        raise ValueError(f"--recipe: unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]

