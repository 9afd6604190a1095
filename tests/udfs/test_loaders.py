"""Each loader round-trips: a tiny model built in memory, saved in the library's own layout, and
loaded back through the production path gives the same outputs."""

import io
import socket

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from core.settings import Settings
from core.errors import UserError
from sample_images import photo
from udfs import captioner, clip, dino, segmenter
from udfs.imaging import decode_rgb
from udfs.zoo import packaged_weights
from udfs.zoo import ModelZoo

IMAGES = [photo(96, 80, seed=1), photo(64, 128, seed=2)]


def test_clip_round_trip(tmp_path):
    built = clip.build_tiny(tmp_path / "clip", seed=3).eval()
    loaded = clip.ClipModel(tmp_path / "clip", device="cpu")
    batch = torch.stack([loaded.preprocess(i) for i in IMAGES])
    with torch.no_grad():
        expected = built.encode_image(batch)
        expected_text = built.encode_text(loaded.tokenizer(["a red cup"]))
    expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()
    expected_text = (expected_text / expected_text.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(loaded.embed_images(IMAGES), expected, atol=1e-5)
    np.testing.assert_allclose(loaded.embed_texts(["a red cup"]), expected_text, atol=1e-5)
    assert len(loaded.tokenizer.encoder) == 49408  # the real CLIP BPE vocabulary, not a stub


def test_dino_round_trip(tmp_path):
    built = dino.build_tiny(tmp_path / "dino", seed=4)
    loaded = dino.DinoModel(tmp_path / "dino", device="cpu")
    inputs = loaded.processor(images=IMAGES, return_tensors="pt")
    with torch.no_grad():
        cls = built(**inputs).last_hidden_state[:, 0]
    np.testing.assert_allclose(loaded.embed_images(IMAGES), (cls / cls.norm(dim=-1, keepdim=True)).numpy(),
                               atol=1e-5)


def test_captioner_round_trip(tmp_path):
    built = captioner.build_tiny(tmp_path / "captioner", seed=5)
    loaded = captioner.Captioner(tmp_path / "captioner", device="cpu", max_new_tokens=8)
    inputs = loaded.processor(images=IMAGES[:1], text=["a photo of"], return_tensors="pt")
    with torch.no_grad():
        expected = built.generate(**inputs, max_new_tokens=8, do_sample=False)
    caption = loaded.caption(IMAGES[:1], "a photo of")[0]
    assert caption == loaded.processor.batch_decode(expected, skip_special_tokens=True)[0].strip()
    assert caption.startswith("a photo of") and len(caption.split()) > 3


def test_sam_round_trip(tmp_path):
    built = segmenter.build_tiny_sam(tmp_path / "sam.pth", seed=6)
    loaded = segmenter.SamSegmenter(tmp_path / "sam.pth", "tiny", device="cpu")
    for name, tensor in built.state_dict().items():
        assert torch.equal(tensor, loaded.predictor.model.state_dict()[name]), name
    # Random SAM finds little: with threshold 0 the mask logic still runs end to end.
    result = loaded.segment([IMAGES[0]], boxes=[[10, 10, 80, 70]])[0]
    assert result.mask.shape == (80, 96) and 0.0 <= result.score <= 1.0


def test_u2netp_recovers_the_gift_box_outline():
    with cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as fh:
        rgba = Image.open(fh).convert("RGBA")
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    truth = np.asarray(rgba.getchannel("A")) >= 128
    result = segmenter.U2NetSegmenter(packaged_weights("u2netp"), device="cpu").segment(
        [decode_rgb(buffer.getvalue())])[0]
    iou = (result.mask & truth).sum() / (result.mask | truth).sum()
    assert iou >= 0.9, iou


def test_missing_model_path_is_a_clear_error(tmp_path):
    settings = Settings.load(tmp_path, models={"clip": {"path": str(tmp_path / "nowhere")}})
    with pytest.raises(UserError, match=r"role 'clip' not found: .*nowhere does not exist"):
        ModelZoo.from_settings(settings).check("clip")


def test_broken_model_folder_is_a_clear_error(tmp_path):
    broken = tmp_path / "dino"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "preprocessor_config.json").write_text("{}")
    zoo = ModelZoo.from_settings(Settings.load(tmp_path, models={"dino": {"path": str(broken)}}))
    zoo.check("dino")  # the files are there...
    with pytest.raises(UserError, match=r"role 'dino' at .*dino failed to load"):
        zoo.load("dino")  # ...but they do not load


def test_loads_are_counted_in_every_process_that_loads(tiny_models, tmp_path):
    """A Spark worker is another process: it records its loads under the home as the driver does,
    so a stage's count covers them (here a child process stands in for the worker)."""
    import os
    import subprocess
    import sys
    import textwrap
    import time

    from udfs.zoo import LOAD_LOG, diffusion_loads_between

    settings = Settings.load(tmp_path / "home", models={"tiny_dir": str(tiny_models), "device": "cpu"})
    ModelZoo.from_settings(settings).check("text2img", "sam")
    started = time.time()
    worker = textwrap.dedent(f"""
        import os
        from core.settings import Settings
        from udfs.zoo import ModelZoo
        settings = Settings.load({str(settings.home)!r}, models={{"tiny_dir": {str(tiny_models)!r}, "device": "cpu"}})
        zoo = ModelZoo.from_settings(settings)
        zoo.load("text2img"); zoo.load("sam")
        print(os.getpid())
    """)
    done = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    log = settings.home / LOAD_LOG
    assert diffusion_loads_between(log, started, time.time()) == 1  # the worker's base model; SAM is no base
    assert diffusion_loads_between(log, time.time(), time.time() + 60) == 0
    assert [f.name for f in log.glob("*.jsonl")] == [f"{socket.gethostname()}-{done.stdout.split()[-1]}.jsonl"]
