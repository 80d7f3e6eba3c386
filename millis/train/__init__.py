"""Training: the shared loop, classifier fine-tuning, distillation, and structured pruning."""
