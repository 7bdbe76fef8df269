"""Distillation: the text it trains and evaluates on (data, packaged corpora), the losses and the engine."""

from kroncompress.distill.corpora import Corpus, corpus_documents, get_corpus, list_corpora, register_corpus
from kroncompress.distill.data import (
    BlockDataset, TextSpec, build_datasets, default_cache_dir, load_text, pack_blocks, parse_data_arg,
    split_blocks, text_spec, token_stream,
)
from kroncompress.distill.losses import DistillationLoss
from kroncompress.distill.checkpoints import ResumeError, last_checkpoint
from kroncompress.distill.trainer import DistillResult, NonFiniteLossError, NonFiniteWeightsError, distill

__all__ = [
    "BlockDataset", "Corpus", "TextSpec", "build_datasets", "corpus_documents", "default_cache_dir", "get_corpus",
    "list_corpora", "load_text", "pack_blocks", "parse_data_arg", "register_corpus", "split_blocks", "text_spec",
    "token_stream",
    "DistillationLoss", "DistillResult", "NonFiniteLossError", "NonFiniteWeightsError", "ResumeError", "distill",
    "last_checkpoint",
]
