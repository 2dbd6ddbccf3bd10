"""Flax linen modules: they own parameters and call the pure kernels."""

from attention_lab.layers.pooling import AttentionPooling
from attention_lab.layers.pooling import masked_mean
from attention_lab.layers.recurrent_attention import AdditiveAttention
from attention_lab.layers.recurrent_attention import LuongAttention
from attention_lab.layers import conv_attention
from attention_lab.layers import rotary
from attention_lab.layers import spectrogram
from attention_lab.layers.attention import AttentionConfig
from attention_lab.layers.attention import CrossAttention
from attention_lab.layers.attention import MultiHeadAttention
from attention_lab.layers.attention import SelfAttention
from attention_lab.layers.conv_attention import CBAM
from attention_lab.layers.conv_attention import ECA
from attention_lab.layers.conv_attention import SqueezeExcite
from attention_lab.layers.transformer import Encoder
from attention_lab.layers.transformer import EncoderBlock
from attention_lab.layers.transformer import LearnedPositionEmbedding
from attention_lab.layers.transformer import MlpBlock
from attention_lab.layers.transformer import sinusoidal_positions

__all__ = [
    "AdditiveAttention", "AttentionConfig", "AttentionPooling", "CBAM", "CrossAttention", "ECA",
    "Encoder", "EncoderBlock", "LearnedPositionEmbedding", "LuongAttention",
    "MlpBlock", "MultiHeadAttention", "SelfAttention", "SqueezeExcite",
    "conv_attention", "masked_mean", "rotary", "sinusoidal_positions", "spectrogram",
]
