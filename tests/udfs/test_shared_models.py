"""A loaded model is shared by every task of a worker process (the embedded engine runs UDFs as
threads of one process; a GPU worker shares each role likewise): called from several threads
at once, each role gives every thread the result it gives one thread alone."""

import threading

import numpy as np
import pytest

from core.settings import Settings
from sample_images import photo, product_shot
from udfs.zoo import ModelZoo

THREADS, ROUNDS = 4, 2
IMAGES = [product_shot(96 + 8 * i, 80 + 4 * i, seed=i) if i % 2 else photo(90, 70 + 6 * i, seed=i)
          for i in range(THREADS)]

# role -> what its UDF asks of it for a list of images, as arrays to compare. SAM keeps the image
# between two calls; DINO stands for the stateless forward passes (clip, captioner, sentence, and
# u2netp, whose onnxruntime session is thread-safe by its documentation), left out to keep the
# suite short. Diffusion pipelines are held by zoo.exclusive.
CALLS = {
    "sam": lambda model, images: [np.concatenate([r.mask.ravel(), [r.score]]) for r in model.segment(images)],
    "dino": lambda model, images: list(model.embed_images(images)),
}


@pytest.mark.parametrize("role", sorted(CALLS))
def test_a_shared_model_gives_each_thread_its_single_thread_result(tiny_models, role):
    zoo = ModelZoo.from_settings(Settings.load(tiny_models / "unused", models={
        "tiny_dir": str(tiny_models), "device": "cpu"}))
    zoo.check(role) if zoo.is_tiny(role) else None
    model, call = zoo.load(role), CALLS[role]
    alone = [call(model, [image])[0] for image in IMAGES]
    results, errors = {}, []
    start = threading.Barrier(THREADS)

    def work(i: int):
        try:
            start.wait()
            results[i] = [call(model, [IMAGES[i]])[0] for _ in range(ROUNDS)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(THREADS):
        for got in results[i]:
            np.testing.assert_allclose(got, alone[i], atol=1e-5, err_msg=f"{role}, thread {i}")
