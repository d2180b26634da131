"""sparsec's CUDA C++ kernels: device code in `.cu` files, compiled at run time by NVRTC (nvrtc.py).

They do what Triton cannot express: shared memory placed by hand, warp shuffles. Each `.cu` file is one
kernel family; its launcher module picks the template instance and the grid; register.py puts them in
the op registry for "cuda", ahead of the Triton kernels, for the shapes they serve.
"""
