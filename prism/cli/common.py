"""What several subcommands share: argument types and defaults."""
from __future__ import annotations

import argparse

from prism.config import ConfigError, parse_size


def size_arg(text: str) -> int:
    """An argparse type for sizes ('4GiB', '512MiB')."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_memory(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    return 4 << 30
