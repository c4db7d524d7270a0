"""Fine-tuning: data, built-in tasks, models and the training loop behind ``lorakit finetune``."""
