"""The annotation-list parser on small fixture files with the real files' quirks."""
import pytest

from hdtf_jax.data import hdtf_lists


def _write(d, name, text, bom=False):
  data = text.encode()
  (d / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)


@pytest.fixture
def lists_dir(tmp_path):
  # WDA: BOM on the url file, trailing spaces, no final newline, a video with a url
  # but no time line, a clip without a crop row, a bad range, a path-escaping name.
  _write(tmp_path, "WDA_video_url.txt",
         "AnnSmith0 https://www.youtube.com/watch?v=a&t=6s\nAnnSmith1 https://x/b\n"
         "BobJones https://x/c \nNoTime https://x/d", bom=True)
  _write(tmp_path, "WDA_resolution.txt", "AnnSmith0.mp4 720\nAnnSmith1.mp4 1080\nBobJones.mp4 0")
  _write(tmp_path, "WDA_annotion_time.txt",
         "AnnSmith0.mp4 00:05-00:10 01:00-1:30 \nAnnSmith1.mp4 00:10-00:05 00:20-00:30\n"
         "BobJones.mp4 0:00-0:02\n../evil.mp4 00:00-00:01")
  _write(tmp_path, "WDA_crop_wh.txt", "AnnSmith0_0.mp4 10 200 5 200 \nAnnSmith1_1.mp4 1 2 3\nGhost_0.mp4 1 2 3 4\n")
  _write(tmp_path, "WDA_crop_ratio.txt", "AnnSmith0_0.mp4 1.2\nAnnSmith0_1.mp4 1.0")
  # RD: complete and clean.
  _write(tmp_path, "RD_video_url.txt", "Radio1 https://x/r1\nRadio12 https://x/r12\n")
  _write(tmp_path, "RD_resolution.txt", "Radio1.mp4 720\nRadio12.mp4 720\n")
  _write(tmp_path, "RD_annotion_time.txt", "Radio1.mp4 00:20-01:35\nRadio12.mp4 00:25-01:00\n")
  _write(tmp_path, "RD_crop_wh.txt", "Radio1_0.mp4 483 390 0 390\nRadio12_0.mp4 299 472 0 472\n")
  _write(tmp_path, "RD_crop_ratio.txt", "Radio1_0.mp4 1.0\nRadio12_0.mp4 1.2\n")
  return tmp_path


def test_counts_fields_and_quirks(lists_dir):
  lists = hdtf_lists.read_lists(lists_dir)
  assert set(lists.videos) == {"AnnSmith0", "AnnSmith1", "BobJones", "NoTime", "Radio1", "Radio12"}
  by_name = {c.name: c for c in lists.clips}
  assert sorted(by_name) == ["AnnSmith0_0", "AnnSmith0_1", "AnnSmith1_1", "BobJones_0",
                             "Radio12_0", "Radio1_0"]
  c = by_name["AnnSmith0_0"]
  assert (c.start_s, c.end_s, c.duration_s) == (5.0, 10.0, 5.0)
  assert c.crop_xwyh == (10, 200, 5, 200) and c.crop_ratio == 1.2 and c.resolution == 720
  assert c.url == "https://www.youtube.com/watch?v=a&t=6s"  # the BOM did not stick to the name
  assert by_name["AnnSmith0_1"].start_s == 60.0 and by_name["AnnSmith0_1"].end_s == 90.0
  assert by_name["AnnSmith0_1"].crop_xwyh is None and by_name["AnnSmith0_1"].crop_ratio == 1.0
  # The malformed first range of AnnSmith1 keeps the second at its official index 1.
  assert by_name["AnnSmith1_1"].clip_index == 1 and by_name["AnnSmith1_1"].crop_xwyh is None
  assert by_name["BobJones_0"].resolution is None
  assert lists.videos["NoTime"].time_ranges == ()
  reasons = [p.reason for p in lists.problems]
  assert any("empty time range" in r for r in reasons)
  assert any("unsafe video name" in r for r in reasons)
  assert any("no time line" in r for r in reasons)
  assert any("unknown resolution" in r for r in reasons)
  assert any("four non-negative integers" in r for r in reasons)
  assert any("not in the time list" in r for r in reasons)  # Ghost_0
  assert lists.num_crop_rows == 5


def test_identities_and_held_out_split(lists_dir):
  lists = hdtf_lists.read_lists(lists_dir)
  ids = {c.name: c.identity for c in lists.clips}
  assert ids["AnnSmith0_0"] == ids["AnnSmith1_1"] == "AnnSmith"
  assert ids["Radio1_0"] == "Radio1" and ids["Radio12_0"] == "Radio12"
  parts = hdtf_lists.split_clips(lists.clips, fraction=0.3, seed=0)
  train_ids = {c.identity for c in parts["train"]}
  test_ids = {c.identity for c in parts["test"]}
  assert test_ids and not (train_ids & test_ids)
  assert len(parts["train"]) + len(parts["test"]) == len(lists.clips)
  assert hdtf_lists.split_clips(lists.clips, 0.3, 0) == parts  # deterministic
  many = [f"Speaker{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(200)]
  assert len(hdtf_lists.held_out_identities(many, 0.05, seed=3)) == 10


@pytest.mark.parametrize("text,seconds", [("00:05", 5), ("1:30", 90), ("01:02:03", 3723), ("7.5", 7.5)])
def test_timestamps(text, seconds):
  assert hdtf_lists.parse_timestamp(text) == seconds


@pytest.mark.parametrize("bad", ["", "1::2", "a:10", "-1"])
def test_bad_timestamps(bad):
  with pytest.raises(ValueError):
    hdtf_lists.parse_timestamp(bad)


def test_missing_folder_and_empty_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hdtf_lists.read_lists(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no HDTF annotation files"):
    hdtf_lists.read_lists(tmp_path)


def test_unsafe_names_rejected():
  for bad in ["../x", "a/b", "..", "x/../../y", ""]:
    with pytest.raises(ValueError):
      hdtf_lists.check_name(bad)
  assert hdtf_lists.check_name("LucilleRoybal-Allard") == "LucilleRoybal-Allard"
