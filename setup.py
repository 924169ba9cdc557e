# The cffi extensions (pylguest._kvm, the KVM layer; pylguest._dataplane,
# the rings and request loops) are the one thing pyproject.toml cannot
# declare by itself: cffi hooks into setuptools through this keyword.
from setuptools import setup

setup(cffi_modules=["csrc/kvm_build.py:ffibuilder", "csrc/dataplane_build.py:ffibuilder"])
