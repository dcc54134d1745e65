"""Reading and writing checkpoints: safetensors, pickles, Mistral's native layout, tokenizers, the hub."""
