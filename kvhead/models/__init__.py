"""Model provisioning (pull, convert, cache) and tiny random test models."""
