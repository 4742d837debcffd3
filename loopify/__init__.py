"""loopify: fold the repeated layers of transformers and multimodal models into recursive loops
with shared weights, compile them with Apache TVM, and measure what it bought."""

__version__ = "0.1.0"
