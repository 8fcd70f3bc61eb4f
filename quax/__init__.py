"""quax: custom array-ish types that flow through unmodified JAX programs."""

import importlib.metadata as _metadata

from . import (
    handlers as handlers,  # registers the higher-order primitive handlers
    lora as lora,
    quantized as quantized,
    zero as zero,
)
from ._errors import (
    HandlerResultError as HandlerResultError,
    NoHandlerError as NoHandlerError,
    QuaxError as QuaxError,
    QuaxifyTypeError as QuaxifyTypeError,
)
from ._quaxify import quaxify as quaxify
from ._values import (
    ArrayValue as ArrayValue,
    Value as Value,
    handler_name as handler_name,
)


__version__ = _metadata.version("quax")
