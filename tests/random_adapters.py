"""LoRA adapters for tests, made without training."""

import torch


def random_adapter(pipeline, path, seed: int, strength: float, text_encoder: bool):
    """A LoRA adapter in diffusers' format whose update is about `strength` x each adapted
    weight's norm (random A and B: what training produces, without training). It is added to
    `pipeline` under its own name, which only makes adapters."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    name = f"random-{seed}"
    modules = {"unet": (pipeline.unet, ["to_q", "to_k", "to_v", "to_out.0"])}
    if text_encoder:
        modules["text_encoder"] = (pipeline.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])
    layers = {}
    for component, (module, targets) in modules.items():
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets)
        inject_adapter_in_model(config, module, adapter_name=name)
        module.peft_config = {**getattr(module, "peft_config", {}), name: config}
        for layer in module.modules():
            if hasattr(layer, "lora_A") and name in layer.lora_A:
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                with torch.no_grad():
                    a.normal_()
                    b.normal_()
                    b.mul_(strength * layer.get_base_layer().weight.norm() / (b @ a).norm())
        layers[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(module, adapter_name=name))
    type(pipeline).save_lora_weights(path, **layers)
    return path
