"""Wire protocol shared by the server and the agent: topics, messages, chunks, signatures.

Nothing here imports torch, onnx or an MQTT client; both sides (and a device) can import it.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1

__all__ = ["SCHEMA_VERSION", "__version__"]
