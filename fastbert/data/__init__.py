"""Data for the book's BERT chapters: vocabulary, SNLI fine-tuning data, WikiText-2
pretraining data, length-aware batching, and where the data comes from (``locate``:
``--data-dir``, ``FASTBERT_DATA``, the cache, the packaged splits; ``download_data``)."""
from .batching import GlobalBatchSampler, trim_collate
from .download import download_data
from .paths import DataNotFoundError, DataSource, fastbert_home, locate, locate_wiki
from .snli import (LABELS, SNLIBERTDataset, find_snli_file, load_snli_split, read_snli,
                   read_snli_file, read_snli_official, read_snli_tsv, snli_vocab,
                   truncated_pair_lengths)
from .vocab import Vocab, count_corpus, tokenize
from .wiki import (BERT_RESERVED_TOKENS, WikiTextDataset, find_wiki_file,
                   get_mlm_data_from_tokens, get_nsp_data_from_paragraph, load_data_wiki,
                   pad_bert_inputs, read_wiki)

__all__ = [
    "Vocab", "tokenize", "count_corpus", "LABELS", "SNLIBERTDataset", "find_snli_file",
    "load_snli_split", "read_snli", "read_snli_official", "read_snli_tsv", "snli_vocab",
    "truncated_pair_lengths", "BERT_RESERVED_TOKENS", "WikiTextDataset", "find_wiki_file",
    "get_mlm_data_from_tokens", "get_nsp_data_from_paragraph", "load_data_wiki",
    "pad_bert_inputs", "read_wiki", "GlobalBatchSampler", "trim_collate",
    "download_data", "DataNotFoundError", "DataSource", "fastbert_home", "locate",
    "locate_wiki", "read_snli_file",
]
