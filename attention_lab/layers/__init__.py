"""Flax linen modules: they own parameters and call the pure kernels."""

from attention_lab.layers.additive import AdditiveAttention
from attention_lab.layers.additive import AttentionPooling
from attention_lab.layers.additive import LuongAttention
from attention_lab.layers.attention import CrossAttention
from attention_lab.layers.attention import MultiHeadAttention
from attention_lab.layers.attention import SelfAttention
from attention_lab.layers.transformer import Encoder
from attention_lab.layers.transformer import EncoderBlock
from attention_lab.layers.transformer import LearnedPositionEmbedding
from attention_lab.layers.transformer import MlpBlock
from attention_lab.layers.transformer import sinusoidal_positions

__all__ = [
    "AdditiveAttention", "AttentionPooling", "CrossAttention", "Encoder",
    "EncoderBlock", "LearnedPositionEmbedding", "LuongAttention", "MlpBlock",
    "MultiHeadAttention", "SelfAttention", "sinusoidal_positions",
]
