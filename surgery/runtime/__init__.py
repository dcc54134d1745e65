"""Running models without judging them: tensor sources, the family's model built from a config, a model
streamed one decoder layer at a time, and its loss and logits against another's. Verification (`surgery.verify`)
decides what the numbers mean; nothing here does."""
