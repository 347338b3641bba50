"""Triton GPU kernels; callers go through the dispatch in :mod:`kvhead.kernels`."""
