"""Stage-1 (G_ani) training configs: `--config=experiments/configs/stage1.py:<preset>`.

Presets:
  paper  the paper's run (PAPER.md §3): paper-size networks, batch 128, windows of 1000 frames
         (10 s at 100 fps) with stride 128, Adam lr 5e-4 held 50 epochs then decayed to 0 over 50.
  demo   learns the synthetic corpus (or the demo dataset) on 2 CPU cores in minutes: small
         networks, batch 16, windows of 256 frames, a fixed number of steps.
  tiny   a smoke run for tests: the tiny networks, batch 4, windows of 64 frames.

The learning rate is held for `optim.hold_steps` and decayed over `optim.decay_steps`; when those
are None they come from `optim.hold_epochs` / `decay_epochs` times the steps of an epoch (the
training windows of the source divided by the global batch). `train.num_steps` None means
hold + decay.
"""
from __future__ import annotations

import ml_collections

from experiments.configs import common
from hdtf_jax.nn import animation

PRESETS = ("paper", "demo", "tiny")


def _base(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = ""
  c.seed = 0
  c.model = model

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"        # 'synthetic' | 'tfds' (hdtf/params, data_builders/hdtf)
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir (None: default)
  c.data.tfds_name = "hdtf/params"
  c.data.batch_size = 128            # global batch, split over the `data` mesh axis
  c.data.window = 1000               # frames at 100 fps
  c.data.stride = 128                # between training windows (defines an epoch)
  c.data.eval_window = 1000          # non-overlapping windows of the held-out clips
  c.data.eval_batch_size = 32
  c.data.max_eval_windows = 512      # cap on the eval set (None: all)
  c.data.stats_batches = 8           # train batches for audio normalisation + mean baseline
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_train_speakers=24, num_test_speakers=6, clips_per_speaker=3, clip_seconds=20.0,
      reference_size=64, audio_noise=0.1, seed=0))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.d_lr = ml_collections.config_dict.placeholder(float)  # None: same as lr
  c.optim.b1 = 0.9                   # Adam defaults, as in the paper
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.hold_epochs = 50
  c.optim.decay_epochs = 50
  c.optim.hold_steps = ml_collections.config_dict.placeholder(int)
  c.optim.decay_steps = ml_collections.config_dict.placeholder(int)

  c.loss = ml_collections.ConfigDict(dict(
      mouth_l1=100.0,                # lambda_mou
      eyebrow_ssim=10.0,             # lambda_ebro (on 1 - temporal SSIM)
      head_ssim=10.0,                # lambda_hed
      gan_mouth=1.0, gan_eyebrow=1.0, gan_head=1.0,   # LSGAN generator terms
      ssim_c1=1e-4, ssim_c2=9e-4))

  c.mesh = common.mesh_config()
  c.distributed = common.distributed_config()

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = ml_collections.config_dict.placeholder(int)
  c.train.log_every = 50
  c.train.eval_every = 1000          # 0: only at the end
  c.train.plot_every = 1000          # track plots of a fixed eval window (0: with every eval)
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = False
  # G_ani starts at the mean parameters: output-conv biases = training means, kernels scaled by
  # this (see `hdtf_jax.train.stage1.init_output_heads`).
  c.train.output_kernel_scale = 0.0
  # Compile the train step without LLVM optimisation: ~2x faster to compile, slower to run on
  # CPU; for smoke tests and short runs only.
  c.train.fast_compile = False

  # LMD-3D when the morphable model loads; the SSIM metric's constants are fixed (the metric's
  # defaults) so eval numbers stay comparable whatever the training loss uses.
  c.eval = ml_collections.ConfigDict(dict(lmd3d=True, ssim_c1=1e-4, ssim_c2=9e-4))
  return c


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"stage-1 config: preset must be one of {PRESETS}, got {preset!r}")
  if preset == "paper":
    c = _base(animation.paper_config())
  elif preset == "demo":
    c = _base(animation.demo_config())
    c.data.update(batch_size=16, window=256, stride=128, eval_window=256, eval_batch_size=32,
                  max_eval_windows=128)
    c.optim.update(hold_steps=400, decay_steps=200)
    c.train.update(log_every=25, eval_every=200, plot_every=200, checkpoint_every=200)
  else:
    c = _base(animation.tiny_config())
    c.data.update(batch_size=4, window=64, stride=32, eval_window=64, eval_batch_size=8,
                  max_eval_windows=16, stats_batches=2)
    c.data.synthetic.update(num_train_speakers=4, num_test_speakers=2, clips_per_speaker=2,
                            clip_seconds=4.0, reference_size=32)
    c.optim.update(hold_steps=20, decay_steps=10)
    c.train.update(log_every=5, eval_every=0, plot_every=0, checkpoint_every=10)
  c.preset = preset
  return c
