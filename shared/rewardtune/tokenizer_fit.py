"""Whether a tokenizer can feed a CLIP-style text encoder: checked when a model is loaded, not at the first batch.

A damaged tokenizer_config.json still loads: a renamed special token becomes a new token whose id is past the
encoder's embedding (IndexError in the first forward), and a missing one leaves transformers' model_max_length
of 1e30 (OverflowError when padding).
"""

from __future__ import annotations

from typing import Any


def tokenizer_misfit(tokenizer: Any, text_config: Any) -> str | None:
    """What makes `tokenizer` unusable with an encoder of `text_config` (vocab_size, max_position_embeddings), or None."""
    if len(tokenizer) > text_config.vocab_size:
        return (f"the tokenizer has {len(tokenizer)} tokens, more than the text encoder's {text_config.vocab_size} "
                "embeddings")
    positions = text_config.max_position_embeddings
    if not 0 < tokenizer.model_max_length <= positions:
        return (f"the tokenizer's model_max_length ({tokenizer.model_max_length:.3g}) does not fit the text encoder's "
                f"{positions} positions")
    return None
