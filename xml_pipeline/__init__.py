"""xml-pipeline: a daemon that runs an organism of listeners exchanging validated XML."""

from xml_pipeline.handler import Handler, HandlerMetadata, HandlerResponse
from xml_pipeline.message.system_payloads import ErrorCode, Huh, SystemErrorPayload

__version__ = "0.1.0"

__all__ = [
    "ErrorCode",
    "Handler",
    "HandlerMetadata",
    "HandlerResponse",
    "Huh",
    "SystemErrorPayload",
    "__version__",
]
