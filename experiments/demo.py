"""The whole system on built-in demo data, one command on a fresh machine.

    python -m experiments.demo --workdir runs/demo

Steps (each one skipped when its output already exists, so a rerun resumes):
  1. source    the HDTF-like demo `manual_dir` from real face photos (`hdtf_jax.data.demo_source`),
  2. data      built as the TFDS datasets `hdtf/params` (stage 1) and `hdtf/256` (stage 2),
  3. stage1    train and evaluate G_ani (`demo` preset, step count tuned below),
  4. stage2    train and evaluate G_vid (`demo` preset, step count tuned below),
  5. evaluate  the full pipeline (audio -> G_ani -> F_app -> G_vid -> frames) on the held-out
               clips, with both stages' tables (`python -m experiments.evaluate`),
  6. generate  an mp4 with sound from `skimage.data.astronaut()` and a held-out speaker's audio,
               through the same `hdtf-jax generate` command a user runs, and a PNG strip of it.
Every step runs as its own process (the commands a user would type), so a failure names the
step and the command to rerun it by hand. A finished step leaves a marker holding its command in
`<workdir>/.demo/`; it is skipped on a rerun with the same command (a changed flag reruns it;
training resumes from its checkpoint). Per-step wall and CPU seconds go to
`<workdir>/demo_timings.json`.
"""
from __future__ import annotations

import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

STEPS = ("source", "data", "stage1", "stage2", "evaluate", "generate")

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where everything goes")
_SEED = flags.DEFINE_integer("seed", 0, "demo source seed")
_STAGES = flags.DEFINE_list("stages", list(STEPS), f"steps to run ({', '.join(STEPS)})")
_STAGE1_PRESET = flags.DEFINE_string("stage1_preset", "demo", "experiments/configs/stage1.py preset")
_STAGE2_PRESET = flags.DEFINE_string("stage2_preset", "demo", "experiments/configs/stage2.py preset")
_EXTRA = flags.DEFINE_multi_string(
    "override", [], "extra arguments of one step, 'STEP:ARG', e.g. "
    "'stage1:--config.train.num_steps=100', 'evaluate:--max_clips=2', 'generate:--fps=30', "
    "'source:--seconds=3'")
_SPEAKERS = flags.DEFINE_integer("speakers", None, "demo source speakers (default: its own, 4)")
_VIDEOS = flags.DEFINE_integer("videos_per_speaker", None,
                               "demo source raw videos per speaker (default: its own, 2)")
_SECONDS = flags.DEFINE_float("seconds", None, "demo source video length (default: its own, 5 s)")

REPO = Path(__file__).resolve().parent.parent

# What fits the whole demo in ~15 min on 2 idle CPU cores (measured: README "Fresh machine");
# applied to the `demo` presets only, before any --override. The presets themselves are the
# quality settings; these are the demo's time budget.
DEMO_OVERRIDES = {
    "stage1": ["--config.train.num_steps=400", "--config.optim.hold_steps=300",
               "--config.optim.decay_steps=100", "--config.train.eval_every=400",
               "--config.train.plot_every=400", "--config.train.checkpoint_every=400"],
    "stage2": ["--config.train.num_steps=200", "--config.optim.hold_steps=150",
               "--config.optim.decay_steps=50", "--config.loss.adversarial_warmup=150",
               "--config.loss.adversarial_ramp=50", "--config.train.eval_every=100",
               "--config.train.checkpoint_every=100", "--config.data.eval_pairs=32"],
}


class Demo:
  """Runs the steps as subprocesses, records their wall and CPU time, skips finished ones."""

  def __init__(self, work: Path):
    self.work = work
    self.marks = work / ".demo"
    self.marks.mkdir(parents=True, exist_ok=True)
    self.timings: dict[str, dict] = {}

  def _mark(self, name: str) -> Path:
    return self.marks / (name.replace(" ", "_").replace("/", "-") + ".json")

  def done(self, name: str, cmd: list[str]) -> bool:
    mark = self._mark(name)
    try:
      return json.loads(mark.read_text()).get("cmd") == cmd
    except (OSError, ValueError):
      return False

  def run(self, name: str, cmd: list[str], *, check_done: bool = True) -> None:
    if check_done and self.done(name, cmd):
      print(f"=== {name}: done before, skipped (delete {self._mark(name)} to rerun)", flush=True)
      return
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    t0, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(cmd, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.time() - t0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != 0:
      raise SystemExit(f"demo step '{name}' failed (exit {res.returncode}); rerun it with:\n  "
                       f"{shlex.join(cmd)}")
    self.timings[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    self._mark(name).write_text(json.dumps({"cmd": cmd, **self.timings[name]}) + "\n")
    self.save_timings()
    print(f"=== {name}: done in {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)

  def save_timings(self) -> Path:
    """Adds this run's step timings to `demo_timings.json` (earlier runs' steps are kept)."""
    path = self.work / "demo_timings.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(self.timings)
    path.write_text(json.dumps(old, indent=1) + "\n")
    return path


def _overrides(step: str) -> list[str]:
  return [o.split(":", 1)[1] for o in _EXTRA.value if o.startswith(step + ":")]


def held_out_audio(source: Path, data: Path, out_wav: Path) -> Path:
  """The audio of the longest held-out clip (`hdtf/params` test split) from its raw demo video."""
  import tensorflow_datasets as tfds
  from hdtf_jax import media
  from hdtf_jax.data import pipelines
  from hdtf_jax.data.clips import ClipSkipped, find_video
  test = tfds.data_source("hdtf/params", split="test", data_dir=str(data))
  reader = pipelines.ClipReader(test, ("clip", "video", "start_s", "end_s"))
  clips = sorted((reader[i] for i in range(len(reader))),
                 key=lambda c: (-(float(c["end_s"]) - float(c["start_s"])), c["clip"]))
  for clip in clips:
    try:
      video = find_video(source, str(clip["video"]))
    except ClipSkipped:  # not in this manual_dir: try the next clip
      continue
    return media.extract_audio(video, out_wav, start_s=float(clip["start_s"]),
                               end_s=float(clip["end_s"]))
  raise SystemExit(f"demo: no raw video in {source} for the held-out clips "
                   f"{[c['clip'] for c in clips]}")


def prepare_generate_inputs(source: Path, data: Path, out: Path) -> tuple[Path, Path]:
  """astronaut.png (`skimage.data.astronaut()`) and held_out.wav in `out`."""
  import cv2
  import skimage.data
  out.mkdir(parents=True, exist_ok=True)
  image, audio = out / "astronaut.png", out / "held_out.wav"
  if not image.exists():
    cv2.imwrite(str(image), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
  if not audio.exists():
    held_out_audio(source, data, audio)
  return image, audio


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  work = Path(_WORKDIR.value).absolute()
  source, data = work / "source", work / "tfds"
  py = sys.executable
  stages = set(_STAGES.value)
  unknown = stages - set(STEPS)
  if unknown:
    raise app.UsageError(f"--stages: unknown {sorted(unknown)}; known: {', '.join(STEPS)}")
  demo = Demo(work)
  started = time.time()

  if "source" in stages:
    if (source / "demo_source.json").exists():
      print(f"=== source: {source} exists, skipped")
    else:
      extra = [f"--{k}={v}" for k, v in (("speakers", _SPEAKERS.value),
                                         ("videos-per-speaker", _VIDEOS.value),
                                         ("seconds", _SECONDS.value)) if v is not None]
      demo.run("source", [py, "-m", "hdtf_jax.data.demo_source", "--out", str(source),
                          "--seed", str(_SEED.value), *extra, *_overrides("source")],
               check_done=False)

  needs_frames = stages & {"stage2", "evaluate", "generate"}
  configs = ["params"] + (["256"] if needs_frames else [])
  if "data" in stages:
    for config in configs:
      if list((data / "hdtf" / config).glob("*/dataset_info.json")):
        print(f"=== data hdtf/{config}: exists, skipped")
        continue
      demo.run(f"data hdtf/{config}", [py, "-m", "data_builders.hdtf", f"--manual_dir={source}",
                                       f"--data_dir={data}", f"--config={config}",
                                       *_overrides("data")], check_done=False)

  runs = {}
  for stage, preset in (("stage1", _STAGE1_PRESET.value), ("stage2", _STAGE2_PRESET.value)):
    run_dir = work / stage
    runs[stage] = run_dir
    if stage not in stages:
      continue
    tuned = DEMO_OVERRIDES[stage] if preset == "demo" else []
    base = [py, "-m", f"experiments.{stage}", f"--config=experiments/configs/{stage}.py:{preset}",
            f"--workdir={run_dir}", "--config.data.source=tfds", f"--config.data.data_dir={data}",
            *tuned, *_overrides(stage)]
    demo.run(f"{stage} train", base + ["--mode=train"])
    demo.run(f"{stage} eval", base + ["--mode=eval"])

  eval_dir = work / "eval"
  if "evaluate" in stages:
    demo.run("evaluate", [py, "-m", "experiments.evaluate", f"--workdir={work}",
                          f"--stage1={runs['stage1']}", f"--stage2={runs['stage2']}",
                          f"--data_dir={data}", *_overrides("evaluate")])

  gen_dir = work / "generate"
  video = gen_dir / "astronaut.mp4"
  if "generate" in stages:
    image, audio = prepare_generate_inputs(source, data, gen_dir)
    cmd = [py, "-m", "hdtf_jax.cli", "generate", f"--image={image}", f"--audio={audio}",
           f"--stage1={runs['stage1']}", f"--stage2={runs['stage2']}", f"--out={video}",
           # The astronaut's face is ~107 px (the default floor is 128): plenty for the
           # demo's 128 px G_vid.
           "--min-face-px=96", "--no-progress", *_overrides("generate")]
    if video.exists() and demo.done("generate", cmd):
      print(f"=== generate: {video} exists, skipped")
    else:
      print(f"(the same as: hdtf-jax {shlex.join(cmd[3:])})")
      demo.run("generate", cmd, check_done=False)
    from hdtf_jax import evaluation
    # Six frames, 104 px high: the README's picture (docs/demo_strip.png) is this file.
    evaluation.video_strip_png(video, gen_dir / "astronaut_strip.png", count=6, height=104)

  timings = demo.save_timings()
  print(f"\nDemo finished in {time.time() - started:.0f} s.")
  print(f"  demo source (raw videos + annotation lists): {source}")
  print(f"  TFDS data_dir: {data}  (tfds.data_source('hdtf/params', data_dir=...))")
  for stage, run_dir in runs.items():
    if run_dir.exists():
      print(f"  {stage}: checkpoints, metrics.jsonl, eval tables and images in {run_dir}")
  if (eval_dir / "results.md").exists():
    print(f"  metrics (both stages and the full pipeline): {eval_dir / 'results.md'} "
          f"(+ results.json, plots *.png)")
  if video.exists():
    print(f"  video: {video}  (frames: {gen_dir / 'astronaut_strip.png'})")
  print(f"  per-step wall / CPU seconds: {timings}")
  if any(r.exists() for r in runs.values()):
    print(f"  TensorBoard: tensorboard --logdir {work}")


if __name__ == "__main__":
  app.run(main)
