"""Stage-2 (G_vid) training configs: `--config=experiments/configs/stage2.py:<preset>`.

Presets:
  paper  the paper's run (PAPER.md §4) at 512 x 512: published widths, batch 2, LSGAN +
         perceptual (VGG-19, lambda 10) + feature matching (lambda 10), Adam lr 4e-4 held 75
         epochs then decayed to 0 over 75. Needs ImageNet VGG-19 weights (`loss.vgg_weights`).
  256    the same networks at 256 x 256 (hourglass one level shallower), batch 8.
  demo   128 px, half widths: learns the synthetic source (or the demo dataset) on 2 CPU cores
         in minutes; an explicitly labelled RANDOM-INIT VGG-19 for the perceptual loss. Not as
         in the paper, to learn in 300 CPU steps: G_vid starts from the warp (mask-head biases,
         the "blend" pixel skip: `hdtf_jax.nn.video`), a pixel MSE term (x1000) leads, the
         perceptual weight is 1 and GAN + feature matching only come in over the last 50
         steps (see the preset).
  tiny   32 px, widths 8-32, batch 4: a smoke run for tests; random-init VGG as well.

An "epoch" of the real data is `data.samples_per_clip` frame pairs of every training clip (the
paper does not say how many pairs an epoch holds; our decision). The learning rate is held for
`optim.hold_steps` and decayed over `optim.decay_steps`; when those are None they come from
`optim.hold_epochs` / `decay_epochs` times the steps of an epoch. `train.num_steps` None means
hold + decay.

Ablations (paper Table 3): train with `--config.model.use_flow=False` ("w/o F_app") or
`--config.model.use_matting=False` ("w/o matting") into their own workdirs and name them in
`eval.no_flow_workdir` / `eval.no_matting_workdir` when evaluating the full model.
"""
from __future__ import annotations

import os

import ml_collections

from experiments.configs import common
from hdtf_jax.nn import video

PRESETS = ("paper", "256", "demo", "tiny")
# Where Keras caches the ImageNet VGG-19 convolution weights (see hdtf_jax.nn.vgg for how to
# obtain them; nothing is ever downloaded at run time).
KERAS_VGG19 = os.path.join("~", ".keras", "models",
                           "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")


def _base(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = ""
  c.seed = 0
  c.model = model

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"        # 'synthetic' | 'tfds' (hdtf/512 or hdtf/256)
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir (None: default)
  c.data.tfds_name = "hdtf/512" if model.image_size > 256 else "hdtf/256"  # resized to image_size
  c.data.batch_size = 2              # global batch, split over the `data` mesh axis
  c.data.samples_per_clip = 100      # frame pairs per training clip and epoch (tfds)
  c.data.eval_pairs = 256            # held-out (reference, driving) pairs scored by eval
  c.data.eval_batch_size = 8
  c.data.val_batch_size = 4          # the fixed validation batch of the logs and image grids
  c.data.synthetic = ml_collections.ConfigDict(dict(
      frames_per_identity=48, train_identities=4, test_identities=2, motion=1.0, seed=0,
      fit_size=256, cache_dir=ml_collections.config_dict.placeholder(str)))

  # F_app (hdtf_jax.face.flow.FlowConfig fields to override), computed on device in the step
  # at the hourglass resolution (image_size / 4 with the published widths).
  c.flow = ml_collections.ConfigDict()

  c.loss = ml_collections.ConfigDict()
  c.loss.gan = 1.0                   # LSGAN generator term
  c.loss.perceptual = 10.0           # lambda of the VGG-19 perceptual loss (paper)
  c.loss.feature_matching = 10.0     # lambda of D_vid feature matching (paper)
  c.loss.l1 = 0.0                    # pixel L1 (NOT in the paper; demo only, see the preset)
  c.loss.l2 = 0.0                    # pixel mean squared error (NOT in the paper; demo only)
  # Not in the paper (0 there): the GAN and feature-matching weights are 0 for the first
  # `adversarial_warmup` steps, then rise linearly to full over `adversarial_ramp` steps
  # (stage2.adversarial_factor).
  c.loss.adversarial_warmup = 0
  c.loss.adversarial_ramp = 0
  c.loss.vgg_weights = KERAS_VGG19   # .h5 (Keras), .pth (torchvision) or .npz (ours)
  c.loss.vgg_random_init = False     # True: random-init VGG-19 (demo/tiny; every log says so)
  c.loss.vgg_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
  c.loss.vgg_layer_weights = (1.0, 1.0, 1.0, 1.0, 1.0)
  c.loss.perceptual_scales = 1       # image pyramid levels (FOMM uses 4)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 4e-4
  c.optim.d_lr = ml_collections.config_dict.placeholder(float)  # None: same as lr
  c.optim.b1 = 0.5                   # FOMM's Adam betas for this discriminator (paper: "Adam")
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.hold_epochs = 75
  c.optim.decay_epochs = 75
  c.optim.hold_steps = ml_collections.config_dict.placeholder(int)
  c.optim.decay_steps = ml_collections.config_dict.placeholder(int)

  c.mesh = common.mesh_config()
  c.distributed = common.distributed_config()

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = ml_collections.config_dict.placeholder(int)
  c.train.log_every = 50
  c.train.eval_every = 2000          # validation PSNR/SSIM + image grid (0: only at the end)
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = False
  # Compile the train step without LLVM optimisation: faster to compile, slower to run on CPU;
  # for smoke tests only.
  c.train.fast_compile = False

  c.eval = ml_collections.ConfigDict()
  c.eval.cpbd = True                 # on frames of at least 64 x 64 (one CPBD block)
  c.eval.lmd = True                  # face-mesh landmarks on generated vs true frames
  c.eval.no_flow_workdir = ml_collections.config_dict.placeholder(str)
  c.eval.no_matting_workdir = ml_collections.config_dict.placeholder(str)
  return c


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"stage-2 config: preset must be one of {PRESETS}, got {preset!r}")
  if preset == "paper":
    c = _base(video.paper_config(512))
  elif preset == "256":
    c = _base(video.config_256())
    c.data.batch_size = 8
  elif preset == "demo":
    c = _base(video.demo_config())
    c.data.update(batch_size=4, eval_pairs=64, eval_batch_size=16, val_batch_size=4)
    c.data.synthetic.update(frames_per_identity=48, train_identities=4, test_identities=2)
    # Random VGG features up to relu3_1: relu4_1/relu5_1 would triple the step's FLOPs (VGG-19
    # to relu5_1 costs ~3x G_vid's forward and backward) for features that are random anyway.
    c.loss.update(vgg_weights=None, vgg_random_init=True,
                  vgg_layers=("relu1_1", "relu2_1", "relu3_1"), vgg_layer_weights=(1.0, 1.0, 1.0))
    # G_vid starts from the warp (video.demo_config: masks ~0.95 at init, "blend" pixel skip).
    # Not in the paper, measured on the demo data (README, Status): a pixel MSE term leads
    # (PSNR is what it scores; L1 alone learnt nothing over the warp, MSE learns where to damp
    # F_app through M_f), the random VGG's weight is cut to 1, and the GAN and feature-matching
    # terms are off for the first 250 steps and ramp in over the last 50 (at the paper's
    # weights feature matching alone pulled G_vid ~2x harder than the random VGG and ~15x
    # harder than L1 x10, away from the warp).
    c.loss.update(l1=0.0, l2=1000.0, perceptual=1.0, adversarial_warmup=250,
                  adversarial_ramp=50)
    c.optim.update(hold_steps=200, decay_steps=100)
    c.train.update(log_every=20, eval_every=100, checkpoint_every=100)
  else:
    c = _base(video.tiny_config())
    c.data.update(batch_size=4, eval_pairs=8, eval_batch_size=4, val_batch_size=2)
    c.data.synthetic.update(frames_per_identity=6, train_identities=2, test_identities=1)
    c.loss.update(vgg_weights=None, vgg_random_init=True,
                  vgg_layers=("relu1_1", "relu2_1"), vgg_layer_weights=(1.0, 1.0))
    c.optim.update(hold_steps=20, decay_steps=10)
    c.train.update(log_every=5, eval_every=0, checkpoint_every=10)
    c.eval.update(cpbd=False, lmd=False)
  c.preset = preset
  return c
