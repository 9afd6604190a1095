"""U2-Net-p in torch (udfs/u2net.py, weights read from the ONNX file) against onnxruntime running
the same file: the sample catalog's real photos give the same saliency and the same masks."""

import dataclasses

import numpy as np
import pytest

from core.settings import Settings
from etl.sample_catalog import write_sample_catalog
from udfs.imaging import decode_rgb
from udfs.onnx_graph import read_graph
from udfs.segmenter import U2NET_CPU_RUNTIME, U2NetSegmenter
from udfs.u2net import U2NetP, convolutions, u2netp_from_graph
from udfs.zoo import ModelZoo, packaged_weights


@pytest.fixture(scope="module")
def sample_photos(tmp_path_factory):
    folder = write_sample_catalog(tmp_path_factory.mktemp("catalog"))
    return [decode_rgb(path.read_bytes()) for path in sorted(folder.glob("*/*.png"))]


def test_torch_u2netp_matches_onnxruntime_on_the_sample_photos(sample_photos):
    onnx = U2NetSegmenter(packaged_weights("u2netp"), "cpu", runtime="onnxruntime")
    torch_net = U2NetSegmenter(packaged_weights("u2netp"), "cpu", runtime="torch")
    assert len(sample_photos) == 5
    expected, got = onnx.saliency(sample_photos), torch_net.saliency(sample_photos)  # torch: one batch of 5
    assert got.shape == expected.shape == (5, 320, 320)
    assert np.abs(got - expected).max() < 5e-4  # measured 7e-5 (float32 rounding); TF32 convs gave 0.08
    masks = [[U2NetSegmenter._postprocess(s, image.size) for s, image in zip(maps, sample_photos)]
             for maps in (expected, got)]  # the segmenter's own postprocessing, as segment() runs it
    for image, a, b in zip(sample_photos, *masks):
        assert a.mask.shape == b.mask.shape == (image.height, image.width)
        assert 0.02 < a.area_fraction < 0.98  # a real product mask, not an empty or full one
        assert (a.mask & b.mask).sum() / (a.mask | b.mask).sum() > 0.999
        assert abs(a.score - b.score) < 1e-3


def test_the_runtime_setting_picks_the_runtime(tmp_path):
    def loaded(runtime):
        settings = Settings.load(tmp_path, models={"device": "cpu", "u2netp_runtime": runtime})
        return ModelZoo.from_settings(settings).load("u2netp")

    assert loaded("auto").runtime == U2NET_CPU_RUNTIME  # no GPU in this process: the faster CPU runtime
    assert loaded("torch").runtime == "torch" and loaded("onnxruntime").runtime == "onnxruntime"
    # Refused when the settings load (core.settings.validate), naming the allowed runtimes.
    with pytest.raises(ValueError, match="models.u2netp_runtime = 'tensorrt' .* is not one of: auto, torch, onnxruntime"):
        loaded("tensorrt")


def test_weights_that_do_not_fit_the_network_fail_loudly():
    graph = read_graph(packaged_weights("u2netp"))
    convs = [n for n in graph.nodes if n.op_type == "Conv"]
    assert len(convs) == len(convolutions(U2NetP()))
    with pytest.raises(ValueError, match="118 Conv nodes, U2-Net-p has 119 convolutions"):
        u2netp_from_graph(dataclasses.replace(graph, nodes=[n for n in graph.nodes if n is not convs[5]]), "x")
    swapped = dataclasses.replace(convs[0], inputs=[convs[0].inputs[0], *convs[1].inputs[1:]])
    with pytest.raises(ValueError, match=r"Conv node 0 .* shapes \(16, 64, 3, 3\)"):
        u2netp_from_graph(dataclasses.replace(graph, nodes=[swapped, *graph.nodes[1:]]), "x")
    undilated = dataclasses.replace(convs[7], attributes={**convs[7].attributes, "dilations": [1, 1]})
    nodes = [undilated if n is convs[7] else n for n in graph.nodes]
    with pytest.raises(ValueError, match="Conv node 7 .* settings"):
        u2netp_from_graph(dataclasses.replace(graph, nodes=nodes), "x")
