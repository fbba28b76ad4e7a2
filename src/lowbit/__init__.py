"""lowbit: make large language models small.

load -> Recipe -> quantize -> evaluate -> export; see README.md and the folders of this package.
"""
__version__ = "0.1.0"

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.numerics.scheme import Scheme  # noqa: E402

__all__ = ["LowbitError", "Scheme", "__version__"]
