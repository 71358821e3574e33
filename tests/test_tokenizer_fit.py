"""`tokenizer_misfit`: the two ways a loadable tokenizer breaks a CLIP text encoder at its first forward."""

from types import SimpleNamespace

from rewardtune.tokenizer_fit import tokenizer_misfit


class Tokenizer:
    def __init__(self, size: int, model_max_length: float) -> None:
        self.size, self.model_max_length = size, model_max_length

    def __len__(self) -> int:
        return self.size


CLIP_L = SimpleNamespace(vocab_size=49408, max_position_embeddings=77)  # SD 1.x's text encoder


def test_a_matching_tokenizer_fits():
    assert tokenizer_misfit(Tokenizer(49408, 77), CLIP_L) is None
    assert tokenizer_misfit(Tokenizer(49000, 64), CLIP_L) is None  # fewer tokens, shorter context: fine


def test_a_token_past_the_embedding_is_named():
    # a renamed special token in tokenizer_config.json is added as token 49408: one past the embedding
    assert tokenizer_misfit(Tokenizer(49409, 77), CLIP_L) == (
        "the tokenizer has 49409 tokens, more than the text encoder's 49408 embeddings")


def test_transformers_default_length_without_a_config_is_named():
    assert tokenizer_misfit(Tokenizer(49408, int(1e30)), CLIP_L) == (
        "the tokenizer's model_max_length (1e+30) does not fit the text encoder's 77 positions")
    assert "model_max_length (0)" in tokenizer_misfit(Tokenizer(49408, 0), CLIP_L)
