"""Tensor parallelism: one model sharded over several processes (`launch.py` starts them, `group.py`
carries rank 0's messages). Rank 0 runs the engine with `runner.TensorParallelDriver` as its model
runner; the followers run each step rank 0 packed, and receive the step's adapters once each
(`adapter_mirror.py`), since every rank applies every ReFT edit to the full hidden state.
"""
