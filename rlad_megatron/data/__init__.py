"""Prompt datasets (JSONL), tokenizers, prompt/SFT formatting, the embedded tiny task."""

from rlad_megatron.data.dataset import PromptDataset, PromptExample, build_prompt_dataset, load_prompt_dataset
from rlad_megatron.data.jsonl import DataError, DataFileNotFoundError, load_jsonl, scan_jsonl, write_jsonl
from rlad_megatron.data.prompts import (
    SFTExample,
    encode_prompt,
    format_prompt,
    gold_answer,
    sft_completion,
    sft_example,
    sft_text,
)
from rlad_megatron.data.sampler import PromptSampler, shard_for_rank
from rlad_megatron.data.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    check_vocab_fits,
)

__all__ = [
    "CharTokenizer", "DataError", "DataFileNotFoundError", "HFTokenizer", "PromptDataset", "PromptExample",
    "PromptSampler", "SFTExample", "SentencePieceTokenizer", "Tokenizer", "build_prompt_dataset",
    "build_tokenizer", "check_vocab_fits", "encode_prompt", "format_prompt", "gold_answer", "load_jsonl",
    "load_prompt_dataset", "scan_jsonl", "sft_completion", "sft_example", "sft_text", "shard_for_rank",
    "write_jsonl",
]
