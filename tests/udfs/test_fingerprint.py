"""Model fingerprints: a weights swap that keeps file names, sizes and modification times (what
`cp -p` and `rsync -a` do) is still seen, and each file's content is hashed once."""

import os
import shutil

import torch
from safetensors.torch import save_file

from core.settings import Settings
from udfs import zoo as zoo_module
from udfs.zoo import DIGEST_CACHE, ModelZoo


def _weights(path, seed: int) -> None:
    save_file({"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}, str(path))


def test_a_swap_keeping_names_sizes_and_times_changes_the_fingerprint(tmp_path, monkeypatch):
    folder = tmp_path / "my-clip"
    folder.mkdir()
    weights = folder / "open_clip_model.safetensors"
    _weights(weights, seed=1)
    zoo = ModelZoo.from_settings(Settings.load(tmp_path / "home", models={"clip": {"path": str(folder)}}))
    reads = []
    monkeypatch.setattr(zoo_module, "file_sha256", lambda f, real=zoo_module.file_sha256: reads.append(f) or real(f))
    before = zoo.fingerprint("clip")
    assert before.startswith("my-clip@") and zoo.fingerprint("clip") == before and len(reads) == 1  # read once

    # Other weights of the same size, copied over the file keeping its modification time (cp -p).
    _weights(tmp_path / "other.safetensors", seed=2)
    stat = weights.stat()
    shutil.copy2(tmp_path / "other.safetensors", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = zoo.fingerprint("clip")
    assert after != before and after.startswith("my-clip@")

    # rsync -a: a new file renamed into place, with the old name and time.
    _weights(tmp_path / "third.safetensors", seed=1)
    os.utime(tmp_path / "third.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(tmp_path / "third.safetensors", weights)
    assert zoo.fingerprint("clip") == before  # the first weights' bytes again: the first fingerprint

    # A new process finds the hashes in <home>/models/weight-digests.json: nothing is read again.
    assert (zoo.tiny_dir.parent / DIGEST_CACHE).exists()
    monkeypatch.setattr(zoo_module, "_DIGESTS", {})
    reads.clear()
    assert zoo.fingerprint("clip") == before and reads == []
