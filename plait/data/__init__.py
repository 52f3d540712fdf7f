"""Corpora, tokenizers, token files and the deterministic global sample order."""

from plait.data.dataset import PreparedData, check_corpus, ensure_prepared, load_data
from plait.data.sampler import GlobalSampler, MixtureSampler, eval_starts, get_batch, make_sampler
from plait.data.tokenizer import Tokenizer, tokenizer_from_json

__all__ = [
    "GlobalSampler",
    "MixtureSampler",
    "PreparedData",
    "Tokenizer",
    "check_corpus",
    "ensure_prepared",
    "eval_starts",
    "get_batch",
    "load_data",
    "make_sampler",
    "tokenizer_from_json",
]
