# The cffi extension (pylguest._kvm) is the one thing pyproject.toml cannot
# declare by itself: cffi hooks into setuptools through this keyword.
from setuptools import setup

setup(cffi_modules=["csrc/kvm_build.py:ffibuilder"])
