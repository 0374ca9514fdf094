"""The Python face of the native ops: documented functions with autograd.

Each op takes an ``engine`` argument (see :mod:`avatar.ops.engine`) and has a
pure-PyTorch reference of the same signature in :mod:`avatar.ops.reference`.
Submodules are imported on demand so ``import avatar.ops`` stays light.
"""
