"""Triton kernels and their launchers, installed as ``diffcore.kernels``: one module per family.

Each module pairs the ``@triton.jit`` kernels with a launcher taking the op's out form (the op's
arguments, then the tensor written); ``_launch`` holds what the launchers share (the device
guard, the operand check, unit-column operands). They run CUDA tensors, and CPU tensors under
``TRITON_INTERPRET=1`` (set before triton is imported), which is how the tests run them.
"""
