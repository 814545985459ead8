"""Triton kernels of softmax_ce, installed as `softmax_ce.kernels`: kernels and launch configs only."""
