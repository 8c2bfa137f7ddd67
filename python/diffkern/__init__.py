"""diffkern: fast, exact, differentiable numerical kernels for PyTorch.

The compiled core (``diffkern._C``) works on raw DLPack arrays; the modules here own
everything torch: custom ops, autograd, distributions. ``python -m diffkern`` prints the
build and runs a self-check and a quick benchmark of every family.
"""
from . import _C

__version__: str = _C.__version__


def build_info() -> dict:
    """How this copy of diffkern was built, plus the CUDA devices it can see now.

    Keys: version, cuda (kernels compiled), cuda_archs, cuda_version, openmp,
    openmp_max_threads, compiler, cuda_device_count (0 without driver/GPU).
    """
    info = dict(_C.build_info())
    # Counted on call, never at import: importing must work without a driver.
    info["cuda_device_count"] = _C.cuda_device_count()
    return info


from .special import log_iv, log_kv, log_ive, log_kve, bessel_iv_ratio  # noqa: E402
from . import special, distributions, ot  # noqa: E402
from . import zo, fd  # noqa: E402
from .attention import prefix_attention, PrefixLayout  # noqa: E402
from . import attention  # noqa: E402
from . import integrations  # noqa: E402  (adapters import their libraries only when used)

__all__ = [
    "__version__",
    "build_info",
    "log_iv",
    "log_kv",
    "log_ive",
    "log_kve",
    "bessel_iv_ratio",
    "special",
    "distributions",
    "ot",
    "zo",
    "fd",
    "attention",
    "prefix_attention",
    "PrefixLayout",
    "integrations",
]
