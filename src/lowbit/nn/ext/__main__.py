"""`python -m lowbit.nn.ext`: build the C++ kernels now (make install runs it); never fails the install."""
import sys

from lowbit.errors import LowbitError
from lowbit.nn import ext

if __name__ == "__main__":
    try:
        ok = ext.load()
    except LowbitError as e:   # e.g. LOWBIT_ISA forcing a variant this CPU can't run
        print(f"lowbit C++ kernels: {e}")
        sys.exit(0)
    print(f"lowbit C++ kernels: {'ready' if ok else 'unavailable (fallbacks will be used)'}: {ext.status()}")
    if ok:
        print("ISA variants: " + ", ".join(f"{k}: {v}" for k, v in ext.isa_status().items()))
    sys.exit(0)
