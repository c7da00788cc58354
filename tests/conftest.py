"""Suite-wide settings.

Triton kernels run through the interpreter on machines without a GPU. Triton
reads TRITON_INTERPRET when a kernel is defined, so it must be set before any
module that defines kernels is imported: that is why it lives here, at the root.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
