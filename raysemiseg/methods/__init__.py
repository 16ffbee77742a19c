"""Methods: the registry is filled by importing each method package."""

from raysemiseg.methods.base import METHODS, Batch, Method, get_method, register

__all__ = ["METHODS", "Batch", "Method", "get_method", "register"]

# Each method package registers itself on import (one line per method; keep alphabetical).
import raysemiseg.methods.cam_classifier  # noqa: E402,F401
import raysemiseg.methods.decoupled  # noqa: E402,F401  (decoupled)
import raysemiseg.methods.dual_branch  # noqa: E402,F401  (dual_branch, single_branch_mixed)
import raysemiseg.methods.lpnet  # noqa: E402,F401  (lnet, lnet_pnet)
import raysemiseg.methods.strong_only  # noqa: E402,F401
import raysemiseg.methods.transfernet  # noqa: E402,F401  (transfernet)
import raysemiseg.methods.wssl  # noqa: E402,F401
