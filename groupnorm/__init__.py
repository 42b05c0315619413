"""groupnorm: Group Normalization (Wu & He, ECCV 2018) for PyTorch.

Public API (everything a user imports lives here):

    group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None, backend=None)
    GroupNorm(num_groups, num_channels, eps=1e-5, affine=True, *, group_size=None, activation=None, policy="strict")
    norm_layer(num_groups=32, *, group_size=None, ...)  -> a `norm_layer` factory for torchvision/timm-style models
    StdConv1d / StdConv2d / StdConv3d                     weight-standardized convolutions
    resolve_groups(num_channels, num_groups, *, group_size=None, policy="strict")
    use_backend(name), last_backend(), available_backends()
    convert_batchnorm(...), check_batch_independence(...)
"""

from groupnorm.backends import last_backend, use_backend
from groupnorm.backends import available as available_backends
from groupnorm.functional import group_norm
from groupnorm.groups import resolve_groups
from groupnorm.layers import GroupNorm, StdConv1d, StdConv2d, StdConv3d, norm_layer

from groupnorm.convert import check_batch_independence, convert_batchnorm

__version__ = "0.1.0"

__all__ = [
    "group_norm",
    "GroupNorm",
    "norm_layer",
    "StdConv1d",
    "StdConv2d",
    "StdConv3d",
    "resolve_groups",
    "use_backend",
    "last_backend",
    "available_backends",
    "convert_batchnorm",
    "check_batch_independence",
]
