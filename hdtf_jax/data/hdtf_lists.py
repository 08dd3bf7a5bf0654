"""The official HDTF annotation lists, quirks and all.

The authors publish five text files per split (RD = radio, WDA, WRA), one ASCII
space between fields:

  <S>_video_url.txt      `Radio1 https://www.youtube.com/watch?v=...`
  <S>_resolution.txt     `Radio1.mp4 720`            (download height; `0` = unknown)
  <S>_annotion_time.txt  `Radio11.mp4 00:30-01:00 01:30-02:30`  (range k -> clip `Radio11_k`)
  <S>_crop_wh.txt        `Radio11_1.mp4 557 478 0 478`  (x w y h at the listed resolution)
  <S>_crop_ratio.txt     `Radio11_1.mp4 1.2`         (landmark-box enlargement)

Quirks in the real files that this parser absorbs (each is recorded as a
`ListProblem` rather than raised, so one bad line never stops a build): a UTF-8
BOM, trailing spaces, no final newline, a video with a url but no time line,
clips without a crop row, resolution `0`, malformed numbers. Names that could
escape the raw-video folder (`../x`, `a/b`) are rejected.

Identities: a video name minus its trailing digits is the speaker
(`AdamKinzinger2` -> `AdamKinzinger`), except in RD, where `Radio<N>` names
carry no identity, so each radio video counts as its own speaker.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

SPLITS = ("RD", "WDA", "WRA")
LIST_KINDS = ("video_url", "resolution", "annotion_time", "crop_wh", "crop_ratio")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclasses.dataclass(frozen=True)
class ListProblem:
  file: str
  line: int
  text: str
  reason: str

  def __str__(self) -> str:
    return f"{self.file}:{self.line}: {self.reason}: {self.text!r}"


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  name: str                     # bare name, no extension: the raw file is <name>.<ext>
  split: str
  identity: str
  url: str | None
  resolution: int | None        # download height the crop boxes refer to
  time_ranges: tuple[tuple[float, float] | None, ...]  # None where a range was malformed


@dataclasses.dataclass(frozen=True)
class ClipEntry:
  name: str                     # `<video>_<k>`
  video: str
  split: str
  identity: str
  clip_index: int
  start_s: float
  end_s: float
  url: str | None
  resolution: int | None
  crop_xwyh: tuple[int, int, int, int] | None
  crop_ratio: float | None

  @property
  def duration_s(self) -> float:
    return self.end_s - self.start_s


@dataclasses.dataclass
class HDTFLists:
  videos: dict[str, VideoEntry]
  clips: list[ClipEntry]
  problems: list[ListProblem]
  num_crop_rows: int = 0

  def summary(self) -> str:
    return (f"{len(self.videos)} videos, {len(self.clips)} clips, "
            f"{self.num_crop_rows} crop rows, {len(self.problems)} problems")


def identity_of(video_name: str, split: str) -> str:
  """Speaker identity used for the held-out split (see module docstring)."""
  if split == "RD":
    return video_name
  return re.sub(r"\d+$", "", video_name) or video_name


def check_name(name: str) -> str:
  """Returns `name` if it is a plain file stem; raises ValueError if it could escape a folder."""
  if not _SAFE_NAME.match(name) or ".." in name:
    raise ValueError(f"unsafe video name {name!r}: names must be plain file stems")
  return name


def parse_timestamp(text: str) -> float:
  """`MM:SS`, `H:MM:SS` or `SS`, optional fraction -> seconds."""
  parts = text.split(":")
  if not 1 <= len(parts) <= 3 or any(p == "" for p in parts):
    raise ValueError(f"bad timestamp {text!r}")
  seconds = 0.0
  for p in parts:
    if not re.fullmatch(r"\d+(\.\d+)?", p):
      raise ValueError(f"bad timestamp {text!r}")
    seconds = seconds * 60 + float(p)
  return seconds


def parse_range(text: str) -> tuple[float, float]:
  start, sep, end = text.partition("-")
  if not sep:
    raise ValueError(f"bad time range {text!r}")
  a, b = parse_timestamp(start), parse_timestamp(end)
  if b <= a:
    raise ValueError(f"empty time range {text!r}")
  return a, b


def _lines(path: Path) -> Iterable[tuple[int, list[str], str]]:
  """(line number, fields, raw text) of non-empty lines; BOMs and stray whitespace removed."""
  text = path.read_bytes().decode("utf-8-sig", errors="replace")
  for i, raw in enumerate(text.splitlines(), start=1):
    line = raw.replace("\ufeff", "").strip()
    if line:
      yield i, line.split(), line


def _stem(name: str) -> str:
  return name[:-4] if name.lower().endswith(".mp4") else name


def read_lists(directory: str | Path, splits: Sequence[str] = SPLITS) -> HDTFLists:
  """Reads all annotation files of `splits` in `directory` into videos and clips.

  A split whose files are all absent is skipped; a split with some files
  missing records a problem per missing file and uses what is there.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"annotation folder {directory} does not exist")
  videos: dict[str, VideoEntry] = {}
  clips: list[ClipEntry] = []
  problems: list[ListProblem] = []
  num_crop_rows = 0
  found_any = False
  for split in splits:
    paths = {k: directory / f"{split}_{k}.txt" for k in LIST_KINDS}
    present = {k: p for k, p in paths.items() if p.is_file()}
    if not present:
      continue
    found_any = True
    for k, p in paths.items():
      if k not in present:
        problems.append(ListProblem(p.name, 0, "", "file missing"))
    table: dict[str, dict[str, tuple[int, list[str], str]]] = {k: {} for k in LIST_KINDS}
    for kind, path in present.items():
      for line_no, fields, raw in _lines(path):
        try:
          key = check_name(_stem(fields[0]))
        except ValueError as e:
          problems.append(ListProblem(path.name, line_no, raw, str(e)))
          continue
        if key in table[kind]:
          problems.append(ListProblem(path.name, line_no, raw, "duplicate name, later line wins"))
        table[kind][key] = (line_no, fields[1:], raw)

    def field_error(kind: str, key: str, reason: str) -> None:
      line_no, _, raw = table[kind][key]
      problems.append(ListProblem(paths[kind].name, line_no, raw, reason))

    names = sorted(set(table["video_url"]) | set(table["annotion_time"]) | set(table["resolution"]))
    for name in names:
      url = None
      if name in table["video_url"]:
        rest = table["video_url"][name][1]
        if rest:
          url = rest[0]
        else:
          field_error("video_url", name, "no url")
      resolution = None
      if name in table["resolution"]:
        rest = table["resolution"][name][1]
        try:
          resolution = int(rest[0]) if rest else 0
        except ValueError:
          field_error("resolution", name, "resolution is not an integer")
        else:
          if resolution <= 0:
            field_error("resolution", name, "unknown resolution (0): crop by landmarks")
            resolution = None
      ranges: list[tuple[float, float] | None] = []
      if name in table["annotion_time"]:
        for text in table["annotion_time"][name][1]:
          try:
            ranges.append(parse_range(text))
          except ValueError as e:
            field_error("annotion_time", name, str(e))
            ranges.append(None)  # keeps later ranges at their official clip index
      else:
        problems.append(ListProblem(paths["annotion_time"].name, 0, name, "video has no time line"))
      identity = identity_of(name, split)
      if name in videos:
        problems.append(ListProblem(paths["video_url"].name, 0, name,
                                    f"video also listed in split {videos[name].split}; kept first"))
        continue
      videos[name] = VideoEntry(name, split, identity, url, resolution, tuple(ranges))
      for k, rng in enumerate(ranges):
        if rng is None:
          continue
        clip = f"{name}_{k}"
        crop = None
        if clip in table["crop_wh"]:
          rest = table["crop_wh"][clip][1]
          try:
            x, w, y, h = (int(v) for v in rest)
            if w <= 0 or h <= 0 or x < 0 or y < 0:
              raise ValueError
            crop = (x, w, y, h)
          except ValueError:
            field_error("crop_wh", clip, "crop row is not four non-negative integers x w y h")
        ratio = None
        if clip in table["crop_ratio"]:
          rest = table["crop_ratio"][clip][1]
          try:
            ratio = float(rest[0])
            if not ratio > 0:
              raise ValueError
          except (ValueError, IndexError):
            field_error("crop_ratio", clip, "crop ratio is not a positive number")
            ratio = None
        clips.append(ClipEntry(clip, name, split, identity, k, rng[0], rng[1], url,
                               resolution, crop, ratio))
    num_crop_rows += len(table["crop_wh"])
    known_clips = {c.name for c in clips if c.split == split}
    for kind in ("crop_wh", "crop_ratio"):
      for clip_name, (line_no, _, raw) in table[kind].items():
        if clip_name not in known_clips:
          problems.append(ListProblem(paths[kind].name, line_no, raw, "row for a clip not in the time list"))
  if not found_any:
    raise FileNotFoundError(
        f"no HDTF annotation files in {directory}: expected e.g. "
        f"{', '.join(f'{s}_annotion_time.txt' for s in splits)}")
  return HDTFLists(videos, clips, problems, num_crop_rows)


def _rank(identity: str, seed: int) -> str:
  return hashlib.sha256(f"{seed}:{identity}".encode()).hexdigest()


def held_out_identities(identities: Iterable[str], fraction: float = 0.05, seed: int = 0) -> set[str]:
  """Deterministic held-out identities: the `ceil(fraction * n)` identities whose
  seeded hash is smallest (at least one whenever fraction > 0)."""
  ids = sorted(set(identities))
  if fraction <= 0 or not ids:
    return set()
  n_test = min(len(ids) - 1, max(1, math.ceil(fraction * len(ids)))) if len(ids) > 1 else 0
  return set(sorted(ids, key=lambda i: _rank(i, seed))[:n_test])


def split_clips(clips: Sequence[ClipEntry], fraction: float = 0.05,
                seed: int = 0) -> dict[str, list[ClipEntry]]:
  """{'train': [...], 'test': [...]} held out by identity (no test speaker in train)."""
  test_ids = held_out_identities((c.identity for c in clips), fraction, seed)
  return {"train": [c for c in clips if c.identity not in test_ids],
          "test": [c for c in clips if c.identity in test_ids]}


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description="Summarise HDTF annotation lists.")
  parser.add_argument("directory")
  parser.add_argument("--problems", action="store_true", help="print every problem line")
  args = parser.parse_args(argv)
  lists = read_lists(args.directory)
  print(lists.summary())
  parts = split_clips(lists.clips)
  hours = sum(c.duration_s for c in lists.clips) / 3600
  print(f"train {len(parts['train'])} clips, test {len(parts['test'])} clips, {hours:.2f} h annotated")
  if args.problems:
    for p in lists.problems:
      print(p)


if __name__ == "__main__":
  main()
