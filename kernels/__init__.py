"""lctk.kernels: Triton kernels with plain-torch references. Importing this package needs torch only
(triton where present), so kernel tests and `make bench-gpu` run on a bare GPU image."""
