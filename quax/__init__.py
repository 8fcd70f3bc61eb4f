"""quax: custom array-ish types that flow through unmodified JAX programs."""

import importlib.metadata as _metadata

from . import (
    handlers as handlers,  # registers the higher-order primitive handlers
    lora as lora,
    named as named,
    prng as prng,
    quantized as quantized,
    sparse as sparse,
    structured as structured,
    units as units,
    zero as zero,
)
from ._errors import (
    HandlerResultError as HandlerResultError,
    HandlerSignatureError as HandlerSignatureError,
    MaterialiseError as MaterialiseError,
    MaterialiseWarning as MaterialiseWarning,
    NoHandlerError as NoHandlerError,
    QuaxError as QuaxError,
    QuaxifyTypeError as QuaxifyTypeError,
    QuaxWarning as QuaxWarning,
)
from ._explain import explain as explain
from ._quaxify import quaxify as quaxify
from ._strict import strict as strict
from ._table import handler as handler, not_handler as not_handler
from ._values import (
    ArrayValue as ArrayValue,
    Value as Value,
    handler_name as handler_name,
)
from .handlers._sharding import leaf_shardings as leaf_shardings


try:
    __version__ = _metadata.version("quax")
except _metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
