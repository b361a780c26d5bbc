"""The ground floor: model loading and family adapters, SubnetSpec, extraction, weight formats.

Importing ``subnet`` registers the heterogeneous Llama-family classes with transformers' Auto classes.
"""

from subnet import hetero  # noqa: F401
