"""What crosses the wire besides hidden states: a 2-D padding mask, and the positions each
side rebuilds from it."""

from __future__ import annotations

import torch


def positions_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Position ids of the last ``query_length`` tokens of a padded batch.

    ``attention_mask`` is ``[batch, past + query_length]`` with 1 for real tokens and 0 for
    padding (left or right). Real tokens count from 0 in order; padding gets position 1, as
    Hugging Face's ``generate`` does, so split and unsplit models agree everywhere.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -query_length:]


def extend_mask(attention_mask: torch.Tensor, new_tokens: int = 1) -> torch.Tensor:
    """The mask after ``new_tokens`` real tokens are appended to every sequence."""
    ones = attention_mask.new_ones((attention_mask.shape[0], new_tokens))
    return torch.cat([attention_mask, ones], dim=-1)


def check_mask(attention_mask: torch.Tensor, batch: int, query_length: int) -> None:
    """Raise ``ValueError`` if a received mask cannot belong to this step."""
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
        raise ValueError(
            f"attention mask must be [batch={batch}, past + {query_length}], "
            f"got {list(attention_mask.shape)}"
        )
    if attention_mask.shape[1] < query_length:
        raise ValueError(
            f"attention mask covers {attention_mask.shape[1]} tokens but this step has "
            f"{query_length}"
        )
