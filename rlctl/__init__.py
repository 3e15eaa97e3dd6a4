"""rlctl: GRPO fine-tuning of LLMs with an FSDP2 policy and colocated SGLang rollouts in one Ray job.

This top-level module must stay light: importing it must not import torch, ray or sglang
(``tests/unit/test_cli_imports.py`` checks this in a subprocess).
"""

__version__ = "0.1.0"
