"""Fused Triton kernels of cs336-kernels (one kernel family per module).

Not the unrelated PyPI package also named ``kernels`` (a kernel hub): ``cs336.ops`` checks the
``CS336_KERNELS`` marker below and says so if the wrong package is imported.
"""

CS336_KERNELS = True
