"""`python -m lowbit.nn.ext`: build the C++ kernels now (make install runs it); never fails the install."""
import sys

from lowbit.nn import ext

if __name__ == "__main__":
    ok = ext.load()
    print(f"lowbit C++ kernels: {'ready' if ok else 'unavailable (fallbacks will be used)'}: {ext.status()}")
    sys.exit(0)
