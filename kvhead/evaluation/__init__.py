"""Accuracy evaluation of decode modes against dense attention on long inputs."""
