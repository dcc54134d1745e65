"""Architectures as data: tensor names, their roles, and which axis means what.

Operators never mention `q_proj` or `StableLm`: they ask for "every tensor whose input axis is
the residual stream" or "the head axis of attn.q". `roles` says what a tensor is, `architecture`
how one family names its tensors, `families` the tables of the supported families.
"""
from .architecture import Architecture
from .families import ARCHITECTURES, architecture_for
from .roles import AXES, MLP_ROLES, WRITERS, Axis, TensorInfo, TensorRole

__all__ = ["ARCHITECTURES", "AXES", "MLP_ROLES", "WRITERS", "Architecture", "Axis", "TensorInfo", "TensorRole",
           "architecture_for"]
