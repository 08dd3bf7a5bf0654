"""`python -m hdtf_jax.face.track` on the real talking-head sample clip."""

import numpy as np

from hdtf_jax import media
from hdtf_jax.face import track

CLIP = media.sample_talking_head_path()


def test_video_to_params_and_preview(tmp_path, capsys):
  assert track.main([str(CLIP), "--out", str(tmp_path), "--size", "256", "--max-seconds", "1"]) == 0
  out = np.load(tmp_path / "carphone_pristine_params.npz")
  t = len(out["found"])
  assert t == 25 and out["found"].all()
  assert out["landmarks"].shape == (t, 468, 3) and out["shape"].shape == (60,)
  assert out["mouth"].shape == (t, 28) and out["eyebrow"].shape == (t, 5) and out["pose"].shape == (t, 5)
  # The default model re-projects onto the detected landmarks within a couple of pixels at 256.
  assert float(np.sqrt(np.mean(out["residual_px"] ** 2))) < 2.0
  frames, _ = media.read_video(tmp_path / "carphone_pristine_preview.mp4")
  assert frames.shape[0] == t and frames.shape[2] == 2 * 256  # landmarks | mesh, side by side
  assert "25/25 frames with a face" in capsys.readouterr().out


def test_missing_video_is_a_clear_error(tmp_path, capsys):
  assert track.main([str(tmp_path / "nope.mp4"), "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "nope.mp4" in err and "Traceback" not in err
