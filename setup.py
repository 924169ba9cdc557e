# The cffi extension (pylguest._native: the KVM layer's C, the rings and
# request loops) is the one thing pyproject.toml cannot declare by itself:
# cffi hooks into setuptools through this keyword.
from setuptools import setup

setup(cffi_modules=["csrc/build.py:ffibuilder"])
