"""LoRA fine-tuning, rare-token choice, generation with adapters, ranking and MLflow tracking."""
