"""lcq.kernels"""
