"""The benchmarks of kvhead: accuracy/, vllm/, kvstore/, gpu/ (README.md); shared: common.py."""
