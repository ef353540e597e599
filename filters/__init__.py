"""The filter library: pure numpy filters, the chain grammar and the codec.

Importing the package registers every filter. Other components use only the names
re-exported here.
"""

from imgpipe.filters import color, effects, geometry  # noqa: F401  (importing registers the filters)
from imgpipe.filters.chain import MAX_FILTERS, Chain, Step, apply_chain, parse_chain
from imgpipe.filters.codec import (
    DEFAULT_MAX_PIXELS,
    EncodeParams,
    ImageInfo,
    check_pixels,
    decode,
    decode_reduced,
    encode,
    probe,
)
from imgpipe.filters.docs import format_filters_text
from imgpipe.filters.formats import (
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    content_type,
    ext,
    output_format,
    sniff,
)
from imgpipe.filters.params import ParamError, ParamInfo, Params, param
from imgpipe.filters.pixels import Image
from imgpipe.filters.registry import REGISTRY, FilterSpec, describe_filters, register

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "INPUT_FORMATS",
    "MAX_FILTERS",
    "OUTPUT_FORMATS",
    "REGISTRY",
    "Chain",
    "EncodeParams",
    "FilterSpec",
    "Image",
    "ImageInfo",
    "ParamError",
    "ParamInfo",
    "Params",
    "Step",
    "apply_chain",
    "check_pixels",
    "content_type",
    "decode",
    "decode_reduced",
    "describe_filters",
    "encode",
    "ext",
    "format_filters_text",
    "output_format",
    "param",
    "parse_chain",
    "probe",
    "register",
    "sniff",
]
