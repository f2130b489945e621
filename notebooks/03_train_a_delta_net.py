# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,kernelspec,-jupytext.text_representation
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Train a delta-rule language model
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/FWJAX_ORG_PLACEHOLDER/fwjax/blob/main/notebooks/03_train_a_delta_net.ipynb)
#
# A character-level language model whose attention layers are delta-rule fast
# weight memories (`fwjax.nn.TransformerLM`), trained with the library's training
# loop (`fwjax.train.train`: checkpoints, `metrics.jsonl`) on Tiny Shakespeare when
# the file is available, on generated text otherwise, with the reference small-LM
# recipe of the `shakespeare_char_delta` config (the budget of
# nanoGPT's "baby" Shakespeare model). Then: the learning curve, samples
# (`fwjax.nn.generate`), and how the loss falls with the context a character has.

# %%
import subprocess
import sys

FWJAX = "fwjax @ git+https://github.com/FWJAX_ORG_PLACEHOLDER/fwjax"
if "google.colab" in sys.modules:  # Colab only; elsewhere use the environment you have
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", FWJAX], check=True)

# %%
import os

# Parameters. FWJAX_NOTEBOOK_FAST=1 (as in CI) runs tiny sizes in seconds.
FAST = os.environ.get("FWJAX_NOTEBOOK_FAST") == "1"
# The reference recipe (full) or a toy model (fast).
STEPS = 30 if FAST else 2000
BATCH, SEGMENT = (4, 32) if FAST else (12, 64)
D_MODEL, LAYERS, HEADS, D_FF = (32, 1, 2, 64) if FAST else (128, 4, 4, 512)
SAMPLE_TOKENS = 64 if FAST else 400
# Tiny Shakespeare: $FWJAX_TEXT_PATH, the repository's ../shared/data, or (Colab)
# a download; None trains on fwjax.data.text.generated_text().
TEXT_PATH = os.environ.get("FWJAX_TEXT_PATH")

# %%
import sys
import tempfile
import urllib.request
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

from fwjax import explain
from fwjax.nn import FastWeightConfig, ModelConfig, generate
from fwjax.ops import FeatureMap, Normalization, UpdateRule
from fwjax.train import (
    CheckpointConfig,
    LMTaskConfig,
    OptimizerConfig,
    Run,
    TrainConfig,
    train,
)
from fwjax.train.metrics import read_metrics

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
    "tinyshakespeare/input.txt"
)
if TEXT_PATH is None:
    for candidate in ["../../shared/data/tinyshakespeare/input.txt",
                      "../shared/data/tinyshakespeare/input.txt"]:
        if Path(candidate).is_file():
            TEXT_PATH = candidate
            break
if TEXT_PATH is None and "google.colab" in sys.modules:
    try:
        TEXT_PATH, _ = urllib.request.urlretrieve(SHAKESPEARE_URL, "input.txt")
    except OSError as e:
        print("download failed, using generated text:", e)
print("text:", TEXT_PATH or "fwjax.data.text.generated_text()")
print("devices:", jax.devices())

# %% [markdown]
# ## 1. Train
#
# 4 layers, $d_\text{model} = 128$, 4 heads, ELU+1 features with sum
# normalisation and the delta rule, in pre-LN blocks with learned positions,
# $\mathcal N(0, 0.02^2)$ embeddings, GELU and residual projections scaled by
# $1/\sqrt{2L}$ (the `ModelConfig` defaults); AdamW $10^{-3}$ with 100 warmup steps
# and cosine decay to $10^{-4}$, weight decay 0.1 on matrices, $\beta_2 = 0.99$,
# clipping at 1, no dropout; batches of `BATCH` windows of `SEGMENT` characters at
# random offsets. On 2 CPU cores the full run takes about 5 minutes and reaches
# about 1.7 nats/char on the validation split (see `experiments/README.md`:
# softmax attention and the other variants under the same recipe, with seeds).

# %%
config = TrainConfig(
    task="lm",
    lm=LMTaskConfig(
        model=ModelConfig(
            d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, d_ff=D_FF,
            max_len=SEGMENT,
            fast_weight=FastWeightConfig(
                feature_map=FeatureMap("elu_p1"),
                normalization=Normalization.SUM,
                update_rule=UpdateRule.DELTA,
            ),
        ),
        dataset="text_file",
        tokenizer="char",
        text_path=TEXT_PATH,
        segment_len=SEGMENT,
        sampling="random_windows",
    ),
    steps=STEPS,
    batch_size=BATCH,
    eval_every=max(STEPS // 8, 1),
    eval_batches=8,
    log_every=max(STEPS // 40, 1),
    progress_bar=False,
    optimizer=OptimizerConfig(
        kind="adamw", learning_rate=1e-3, warmup_steps=min(100, STEPS // 5),
        final_lr_fraction=0.1, b2=0.99, weight_decay=0.1, clip_norm=1.0,
    ),
    checkpoint=CheckpointConfig(every_steps=STEPS, keep=1),
)
workdir = Path(tempfile.mkdtemp(prefix="fwjax_delta_lm_"))
summary = train(config, workdir)

# %%
records = read_metrics(workdir)
train_rec = [r for r in records if r["split"] == "train"]
eval_rec = [r for r in records if r["split"] == "eval"]
plt.plot([r["step"] for r in train_rec], [r["loss"] for r in train_rec],
         label="train")
plt.plot([r["step"] for r in eval_rec], [r["loss"] for r in eval_rec], "o-",
         label="validation")
plt.xlabel("step")
plt.ylabel("nats per character")
plt.title("Learning curve")
plt.legend()
plt.show()
print("final validation:", summary["eval"])

# %% [markdown]
# ## 2. Sample
#
# `fwjax.train.loop.Run` restores the last checkpoint and holds the character
# vocabulary (`run.task.tokenizer`). When a prompt and its continuation fit the
# model's `SEGMENT` learned positions, `generate` processes the prompt in parallel
# and decodes one token per step from the carried fast weights; here they do not,
# so it predicts each character from the last `SEGMENT` characters at most,
# recomputed, as nanoGPT does.

# %%
run = Run(config, workdir)
run.checkpointer.close()
model = run.model()
tokenizer = run.task.tokenizer
prompt = "ROMEO:\n" if TEXT_PATH else "the old king "
tokens = generate(model, jax.numpy.asarray(tokenizer.encode(prompt))[None],
                  SAMPLE_TOKENS, key=jax.random.key(0), temperature=0.8)
print(tokenizer.decode(np.asarray(tokens[0])))

# %% [markdown]
# ## 3. How much context the model uses
#
# The loss of every position of validation windows of `SEGMENT` characters
# (`fwjax.explain.per_position_loss`): the first character of a window is
# predicted from nothing, the last from `SEGMENT − 1` characters of context. How
# fast the curve falls and where it flattens shows how much of its context the
# fast weight memory has learned to use.

# %%
valid = np.asarray(run.task.valid_tokens)
rows = min(64, (len(valid) - 1) // SEGMENT)
starts = np.arange(rows) * SEGMENT
x = valid[starts[:, None] + np.arange(SEGMENT)]
y = valid[starts[:, None] + np.arange(SEGMENT) + 1]
curve = explain.per_position_loss(model, x, y, segment_len=SEGMENT, carry=False)
plt.plot(np.arange(SEGMENT), curve)
plt.xlabel("position in the window (characters of context)")
plt.ylabel("nats per character")
plt.title(f"Validation loss by position ({rows} windows)")
plt.show()
print(f"position 0: {curve[0]:.3f} nats; last 8 positions: {curve[-8:].mean():.3f}")
