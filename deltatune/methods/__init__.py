"""Adapter methods; importing this package registers every built-in method."""
from deltatune.methods import lora  # noqa: F401
from deltatune.methods import dora  # noqa: F401  (after lora: DoRA is a LoRA variant)
from deltatune.methods import ia3  # noqa: F401
from deltatune.methods import bottleneck  # noqa: F401
