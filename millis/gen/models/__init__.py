"""The decoder families: Llama / Mistral / Qwen2 (llama), GPT-2 (gpt2), and what they share (layers)."""
