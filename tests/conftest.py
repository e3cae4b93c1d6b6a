"""Test configuration: Triton kernels run on CPU tensors through the interpreter, which must be
switched on before triton is first imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
