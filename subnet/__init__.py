"""The ground floor: model loading and family adapters, SubnetSpec, extraction, weight formats.

Importing ``subnet`` registers the heterogeneous Llama-family classes with transformers' Auto classes,
and, when it comes before torch, keeps MKL from caching freed buffers (``subnet.heap``).
"""

from subnet.heap import keep_mkl_from_caching_buffers

keep_mkl_from_caching_buffers()  # before hetero imports torch

from subnet import hetero  # noqa: E402, F401
