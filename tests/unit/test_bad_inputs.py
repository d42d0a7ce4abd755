"""Table-driven malformed inputs: every user-supplied thing (config, JSONL data, tokenizer file,
HF directory, converted or training checkpoint) fails with ONE clean line naming the file/field,
raised from rlad_megatron's own code, never a traceback from deep inside torch/megatron/yaml.

Each case builds its bad input in a fresh temporary directory and returns ``(call, needles)``:
``call()`` must raise the case's exception type (a ValueError or FileNotFoundError subclass) with
every needle in its one-line message. Checkpoints, which need a megatron model, are in
``test_bad_checkpoints.py``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rlad_megatron.config import ConfigError, DataConfig, load_config
from rlad_megatron.data import (
    CharTokenizer,
    DataError,
    DataFileNotFoundError,
    HFTokenizer,
    SentencePieceTokenizer,
    build_prompt_dataset,
    build_tokenizer,
    check_vocab_fits,
    load_jsonl,
    load_prompt_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny_cpu.yaml"
PACKAGE = str(ROOT / "rlad_megatron")
FIELDS = ("question", "answer")

Make = Callable[[Path], tuple[Callable[[], object], list[str]]]


@dataclass(frozen=True)
class Case:
    name: str
    make: Make
    error: type[BaseException]


def check_clean(exc: BaseException, *, error: type[BaseException], needles: list[str]) -> None:
    """The contract every malformed input must meet."""
    assert isinstance(exc, error), f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
    assert isinstance(exc, (ValueError, FileNotFoundError)), type(exc).__mro__
    msg = str(exc)
    assert "\n" not in msg.strip(), f"expected a one-line message, got:\n{msg}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    frames = traceback.extract_tb(exc.__traceback__)
    raised_in = frames[-1].filename if frames else "?"
    assert raised_in.startswith(PACKAGE), f"raised from {raised_in}, not from rlad_megatron: {msg}"


def run_case(case: Case, tmp: Path) -> None:
    call, needles = case.make(tmp)
    with pytest.raises(BaseException) as info:  # noqa: PT011 - the type is checked by check_clean
        call()
    check_clean(info.value, error=case.error, needles=needles)


# ---------------------------------------------------------------- configs (load_config -> ConfigError)


def _cfg_file(text: str | bytes) -> Make:
    def make(tmp: Path):
        path = tmp / "bad.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return (lambda: load_config(path)), [str(path)]
    return make


def _cfg_override(*overrides: str, field: str, names_file: bool = True) -> Make:
    def make(tmp: Path):
        return (lambda: load_config(TINY, list(overrides))), [str(TINY), field] if names_file else [field]
    return make


def _cfg_tree(tree: dict, field: str) -> Make:
    def make(tmp: Path):
        path = tmp / "bad.yaml"
        path.write_text(yaml.safe_dump(tree))
        return (lambda: load_config(path)), [str(path), field]
    return make


CONFIG_CASES = [
    Case("config_missing_file", lambda tmp: ((lambda: load_config(tmp / "nope.yaml")), ["nope.yaml"]), ConfigError),
    Case("config_is_directory", lambda tmp: ((lambda: load_config(tmp)), [str(tmp)]), ConfigError),
    Case("config_invalid_yaml", _cfg_file("student: [1, 2\nteacher: {"), ConfigError),
    Case("config_top_level_list", _cfg_file("- 1\n- 2\n"), ConfigError),
    Case("config_not_utf8", _cfg_file(b"student:\n  model:\n    num_layers: \xff\xfe\n"), ConfigError),
    Case("config_unknown_section", _cfg_tree({"studnet": {}}, "studnet"), ConfigError),
    Case("config_unknown_nested_key", _cfg_tree({"rl": {"groupsize": 4}}, "rl.groupsize"), ConfigError),
    Case("config_section_is_scalar", _cfg_tree({"rl": 3}, "rl"), ConfigError),
    Case("config_string_for_int", _cfg_override("--rl.group_size=four", field="rl.group_size"), ConfigError),
    Case("config_bool_for_int", _cfg_override("--train.steps=true", field="train.steps"), ConfigError),
    Case("config_float_for_int", _cfg_override("--train.steps=2.5", field="train.steps"), ConfigError),
    Case("config_string_for_float", _cfg_override("--optimizer.lr=fast", field="optimizer.lr"), ConfigError),
    Case("config_int_for_bool", _cfg_override("--data.shuffle=2", field="data.shuffle"), ConfigError),
    Case("config_bad_literal", _cfg_override("--distill.objective=ppo", field="distill.objective"), ConfigError),
    Case("config_bad_dtype", _cfg_override("--student.model.params_dtype=fp8", field="params_dtype"), ConfigError),
    Case("config_negative_layers", _cfg_override("--student.model.num_layers=-1", field="student.model.num_layers"),
         ConfigError),
    Case("config_heads_vs_groups", _cfg_override("--student.model.num_query_groups=3",
                                                 field="student.model.num_query_groups"), ConfigError),
    Case("config_tp_vs_heads", _cfg_override("--student.parallel.tensor_model_parallel_size=3",
                                             "--teacher.parallel.tensor_model_parallel_size=3",
                                             field="tensor_model_parallel_size"), ConfigError),
    Case("config_pp_vs_layers", _cfg_override("--student.parallel.pipeline_model_parallel_size=3",
                                              "--teacher.parallel.pipeline_model_parallel_size=3",
                                              field="pipeline_model_parallel_size"), ConfigError),
    Case("config_teacher_tp_vs_heads", _cfg_override("--teacher.parallel.tensor_model_parallel_size=3",
                                                     field="teacher.parallel.tensor_model_parallel_size"),
         ConfigError),
    Case("config_full_logits_separate_layout", _cfg_override("--teacher.parallel.tensor_model_parallel_size=1",
                                                             "--distill.teacher_topk=0",
                                                             field="distill.teacher_topk"), ConfigError),
    Case("config_student_offload", _cfg_override("--student.offload=true", field="student.offload"), ConfigError),
    Case("config_vocab_mismatch", _cfg_override("--teacher.model.vocab_size=31", field="teacher.model.vocab_size"),
         ConfigError),
    Case("config_mini_batch", _cfg_override("--rl.mini_batch_size=7", field="rl.mini_batch_size"), ConfigError),
    Case("config_micro_batch", _cfg_override("--rl.micro_batch_size=5", field="rl.micro_batch_size"), ConfigError),
    Case("config_top_p", _cfg_override("--rl.top_p=0", field="rl.top_p"), ConfigError),
    Case("config_alpha", _cfg_override("--distill.alpha=1.5", field="distill.alpha"), ConfigError),
    Case("config_negative_clamp", _cfg_override("--distill.teacher_clamp=-1", field="distill.teacher_clamp"),
         ConfigError),
    Case("config_c_dual", _cfg_override("--distill.c_dual=1", field="distill.c_dual"), ConfigError),
    Case("config_min_lr", _cfg_override("--optimizer.min_lr=1", field="optimizer.min_lr"), ConfigError),
    Case("config_template", _cfg_override("--data.prompt_template=Q:", field="data.prompt_template"), ConfigError),
    Case("config_negative_steps", _cfg_override("--train.steps=-3", field="train.steps"), ConfigError),
    Case("config_override_without_dashes", _cfg_override("rl.group_size=4", field="rl.group_size", names_file=False),
         ConfigError),
    Case("config_override_without_value", _cfg_override("--rl.group_size", field="rl.group_size", names_file=False),
         ConfigError),
    Case("config_override_into_scalar", _cfg_override("--train.steps.x=3", field="train.steps"), ConfigError),
]


# ---------------------------------------------------------------- JSONL data (DataError)


def _jsonl(content: bytes, *, needles: tuple[str, ...] = (), max_line_bytes: int | None = None) -> Make:
    def make(tmp: Path):
        path = tmp / "data.jsonl"
        path.write_bytes(content)
        kwargs = {} if max_line_bytes is None else {"max_line_bytes": max_line_bytes}
        return (lambda: load_jsonl(path, fields=FIELDS, **kwargs)), [str(path), *needles]
    return make


def _good_line(i: int = 0) -> bytes:
    return json.dumps({"question": f"{i}+1=", "answer": f"#### {i + 1}"}).encode() + b"\n"


def _dataset(content: bytes, *, needles: tuple[str, ...] = (), tokenizer=None, max_prompt_length=None) -> Make:
    def make(tmp: Path):
        path = tmp / "data.jsonl"
        path.write_bytes(content)
        call = functools.partial(load_prompt_dataset, path, prompt_template="{question}", tokenizer=tokenizer,
                                 max_prompt_length=max_prompt_length)
        return call, [str(path), *needles]
    return make


DATA_CASES = [
    Case("data_missing_file", lambda tmp: ((lambda: load_jsonl(tmp / "none.jsonl", fields=FIELDS)), ["none.jsonl"]),
         DataFileNotFoundError),
    Case("data_directory", lambda tmp: ((lambda: load_jsonl(tmp, fields=FIELDS)), [str(tmp)]), DataError),
    Case("data_empty_file", _jsonl(b"", needles=("empty",)), DataError),
    Case("data_only_blank_lines", _jsonl(b"\n\n  \n", needles=("empty",)), DataError),
    Case("data_not_utf8", _jsonl(_good_line() + b'{"question": "\xff\xfe", "answer": "#### 1"}\n',
                                 needles=(":2:", "UTF-8")), DataError),
    Case("data_latin1_file", _jsonl('{"question": "caf\u00e9", "answer": "#### 1"}\n'.encode("latin-1"),
                                    needles=(":1:", "UTF-8")), DataError),
    Case("data_invalid_json", _jsonl(_good_line() + b'{"question": "1+1=", "answer": \n', needles=(":2:", "JSON")),
         DataError),
    Case("data_truncated_last_line", _jsonl(_good_line() + _good_line(1)[:20], needles=(":2:",)), DataError),
    Case("data_array_line", _jsonl(b'["1+1=", "#### 2"]\n', needles=(":1:", "JSON object")), DataError),
    Case("data_scalar_line", _jsonl(b'42\n', needles=(":1:", "JSON object")), DataError),
    Case("data_missing_field", _jsonl(b'{"question": "1+1="}\n', needles=(":1:", "'answer'")), DataError),
    Case("data_renamed_field", _jsonl(b'{"prompt": "1+1=", "answer": "#### 2"}\n', needles=("'question'",)),
         DataError),
    Case("data_int_field", _jsonl(b'{"question": "1+1=", "answer": 2}\n', needles=("'answer'", "int")), DataError),
    Case("data_null_field", _jsonl(b'{"question": null, "answer": "#### 2"}\n', needles=("'question'",)), DataError),
    Case("data_empty_field", _jsonl(b'{"question": "   ", "answer": "#### 2"}\n', needles=("'question'", "non-empty")),
         DataError),
    Case("data_huge_line", _jsonl(b'{"question": "' + b"1" * (1 << 20) + b'", "answer": "#### 1"}\n',
                                  needles=(":1:", "bytes")), DataError),
    Case("data_line_over_custom_limit", _jsonl(_good_line() * 3 + b'{"question": "' + b"9" * 300 + b'"}\n',
                                               needles=(":4:", "at most 100 bytes"), max_line_bytes=100), DataError),
    Case("data_utf8_bom", _jsonl(b"\xef\xbb\xbf" + _good_line(), needles=(":1:",)), DataError),
    Case("data_nul_bytes", _jsonl(b"\x00" * 64 + b"\n", needles=(":1:",)), DataError),
    Case("data_answer_without_marker", _dataset(b'{"question": "1+1=", "answer": "2"}\n', needles=(":1:", "####")),
         DataError),
    Case("data_answer_empty_after_marker", _dataset(b'{"question": "1+1=", "answer": "#### "}\n',
                                                    needles=(":1:", "'answer'")), DataError),
    Case("data_char_outside_alphabet", _dataset(b'{"question": "one plus one", "answer": "#### 2"}\n',
                                                needles=(":1:", "'question'"), tokenizer=CharTokenizer()), DataError),
    Case("data_every_prompt_too_long", _dataset(_good_line(123), needles=("usable",), tokenizer=CharTokenizer(),
                                                max_prompt_length=2), DataError),
    Case("data_eval_path_unset", lambda tmp: ((lambda: build_prompt_dataset(DataConfig(eval_path=None),
                                                                            split="eval")), ["data.eval_path"]),
         ValueError),
]


# ---------------------------------------------------------------- tokenizer files


def _char_file(content: bytes, *needles: str) -> Make:
    def make(tmp: Path):
        path = tmp / "vocab.json"
        path.write_bytes(content)
        return (lambda: CharTokenizer.from_file(path)), [str(path), *needles]
    return make


def _sp_file(content: bytes) -> Make:
    def make(tmp: Path):
        path = tmp / "tok.model"
        path.write_bytes(content)
        return (lambda: SentencePieceTokenizer(path=path)), [str(path)]
    return make


def _hf_tokenizer_dir(files: dict[str, bytes]) -> Make:
    def make(tmp: Path):
        d = tmp / "hf_tok"
        d.mkdir()
        for name, content in files.items():
            (d / name).write_bytes(content)
        return (lambda: HFTokenizer(path=d)), [str(d)]
    return make


def _no_eos_sentencepiece(tmp: Path):
    import sentencepiece as spm

    text = tmp / "corpus.txt"
    text.write_text("\n".join(f"{a} plus {b} is {a + b}" for a in range(30) for b in range(30)))
    spm.SentencePieceTrainer.Train(input=str(text), model_prefix=str(tmp / "noeos"), vocab_size=40,
                                   eos_id=-1, minloglevel=2)
    path = tmp / "noeos.model"
    return (lambda: SentencePieceTokenizer(path=path)), [str(path), "EOS"]


TOKENIZER_CASES = [
    Case("tok_char_missing", lambda tmp: ((lambda: CharTokenizer.from_file(tmp / "v.json")), ["v.json"]),
         FileNotFoundError),
    Case("tok_char_not_json", _char_file(b"alphabet: 0123"), ValueError),
    Case("tok_char_not_utf8", _char_file(b'{"alphabet": "\xff\xfe"}'), ValueError),
    Case("tok_char_no_alphabet", _char_file(b'{"letters": "abc"}', "alphabet"), ValueError),
    Case("tok_char_alphabet_not_string", _char_file(b'{"alphabet": [1, 2]}', "alphabet"), ValueError),
    Case("tok_char_empty_alphabet", _char_file(b'{"alphabet": ""}', "alphabet"), ValueError),
    Case("tok_char_duplicate_chars", _char_file(b'{"alphabet": "0120"}', "alphabet", "'0'"), ValueError),
    Case("tok_sp_missing", lambda tmp: ((lambda: SentencePieceTokenizer(path=tmp / "t.model")), ["t.model"]),
         FileNotFoundError),
    Case("tok_sp_directory", lambda tmp: ((lambda: SentencePieceTokenizer(path=tmp)), [str(tmp)]), FileNotFoundError),
    Case("tok_sp_garbage", _sp_file(os.urandom(512)), ValueError),
    Case("tok_sp_empty", _sp_file(b""), ValueError),
    Case("tok_sp_no_eos", _no_eos_sentencepiece, ValueError),
    Case("tok_hf_missing_dir", lambda tmp: ((lambda: HFTokenizer(path=tmp / "nodir")), ["nodir"]), FileNotFoundError),
    Case("tok_hf_empty_dir", _hf_tokenizer_dir({}), ValueError),
    Case("tok_hf_garbage_tokenizer_json", _hf_tokenizer_dir({"tokenizer.json": b"{not json",
                                                             "tokenizer_config.json": b"{}"}), ValueError),
    Case("tok_hf_bad_tokenizer_config", _hf_tokenizer_dir({"tokenizer_config.json": b"[1, 2"}), ValueError),
    Case("tok_path_unset", lambda tmp: ((lambda: build_tokenizer(DataConfig(tokenizer_type="sentencepiece",
                                                                            tokenizer_path=None))),
                                        ["data.tokenizer_path"]), ValueError),
    Case("tok_vocab_too_small", lambda tmp: ((lambda: check_vocab_fits(CharTokenizer(), model_vocab_size=10)),
                                             ["student.model.vocab_size", "20", "10"]), ValueError),
]


# ---------------------------------------------------------------- HF directories (read / convert)


def _hf(mutate: Callable[[Path], None], *needles: str, convert: bool = False, names_dir: bool = True,
        **convert_kwargs) -> Make:
    """Copy the tiny HF directory, break it with ``mutate``, then read (or convert) it."""
    def make(tmp: Path):
        from rlad_megatron.conversion import convert_hf_to_megatron
        from rlad_megatron.hf import read_hf_checkpoint

        d = tmp / "hf"
        shutil.copytree(make.base, d)
        mutate(d)
        if convert:
            call = functools.partial(convert_hf_to_megatron, hf_dir=d, out_dir=tmp / "out", **convert_kwargs)
        else:
            call = functools.partial(read_hf_checkpoint, d)
        return call, [str(d), *needles] if names_dir else list(needles)
    return make


def _edit_config(**changes):
    def mutate(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return mutate


def _write(name: str, content: bytes):
    return lambda d: (d / name).write_bytes(content)


def _truncate(d: Path, fraction: float = 0.5):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: int(p.stat().st_size * fraction)])


def _edit_tensors(fn):
    def mutate(d: Path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(d / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return mutate


def _as_sharded_index(weight_map_fn):
    def mutate(d: Path):
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        from safetensors import safe_open

        with safe_open(str(d / "model-00001-of-00001.safetensors"), framework="pt") as f:
            names = list(f.keys())
        index = {"metadata": {}, "weight_map": weight_map_fn(names)}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return mutate


def _zeros(*shape):
    import torch

    return torch.zeros(*shape)


HF_CASES = [
    Case("hf_missing_dir", lambda tmp: ((lambda: __import__("rlad_megatron.hf", fromlist=["x"])
                                         .read_hf_checkpoint(tmp / "nodir")), ["nodir"]), FileNotFoundError),
    Case("hf_no_config", _hf(lambda d: (d / "config.json").unlink(), "config.json"), FileNotFoundError),
    Case("hf_config_invalid_json", _hf(_write("config.json", b"{\"model_type\": "), "config.json"), ValueError),
    Case("hf_config_not_utf8", _hf(_write("config.json", b"{\"model_type\": \"\xff\"}"), "config.json"), ValueError),
    Case("hf_config_is_list", _hf(_write("config.json", b"[]"), "config.json"), ValueError),
    Case("hf_unknown_model_type", _hf(_edit_config(model_type="gpt2"), "model_type", "gpt2"), ValueError),
    Case("hf_missing_hidden_size", _hf(_edit_config(hidden_size=None), "hidden_size"), ValueError),
    Case("hf_hidden_size_not_int", _hf(_edit_config(hidden_size="sixty-four"), "hidden_size"), ValueError),
    Case("hf_gelu", _hf(_edit_config(hidden_act="gelu"), "hidden_act"), ValueError),
    Case("hf_rope_scaling", _hf(_edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type"),
         ValueError),
    Case("hf_heads_vs_kv_heads", _hf(_edit_config(num_key_value_heads=3), "num_query_groups"), ValueError),
    Case("hf_no_weights", _hf(lambda d: (d / "model.safetensors").unlink(), "model.safetensors"), FileNotFoundError),
    Case("hf_pickle_only", _hf(lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                               "pytorch_model.bin"), ValueError),
    Case("hf_truncated_weights", _hf(_truncate, "model.safetensors", "truncated"), ValueError),
    Case("hf_weights_only_header_bytes", _hf(lambda d: _truncate(d, 0.001), "model.safetensors"), ValueError),
    Case("hf_garbage_weights", _hf(_write("model.safetensors", os.urandom(4096)), "model.safetensors"), ValueError),
    Case("hf_empty_weights", _hf(_write("model.safetensors", b""), "model.safetensors"), ValueError),
    Case("hf_missing_tensor", _hf(_edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                                  "model.layers.1.mlp.up_proj.weight"), ValueError),
    Case("hf_unexpected_tensor", _hf(_edit_tensors(lambda t: t.update({"model.layers.7.extra": _zeros(2)})),
                                     "model.layers.7.extra"), ValueError),
    Case("hf_wrong_shape", _hf(_edit_tensors(lambda t: t.update({"model.norm.weight": _zeros(65)})),
                               "model.norm.weight", "(64,)", "(65,)"), ValueError),
    Case("hf_layers_more_than_tensors", _hf(_edit_config(num_hidden_layers=3), "model.layers.2"), ValueError),
    Case("hf_index_empty_weight_map", _hf(_as_sharded_index(lambda names: {}), "weight_map"), ValueError),
    Case("hf_index_missing_shard", _hf(_as_sharded_index(lambda names: {n: "model-00002-of-00002.safetensors"
                                                                         for n in names}),
                                       "model-00002-of-00002.safetensors"), FileNotFoundError),
    Case("hf_convert_tp_not_dividing", _hf(lambda d: None, "tensor_model_parallel_size", convert=True, tp=3),
         ValueError),
    Case("hf_convert_output_not_empty", _hf(lambda d: (d.parent / "out").mkdir() or (d.parent / "out" / "x")
                                            .write_text("keep"), "out: output directory", "not empty", convert=True,
                                            names_dir=False), ValueError),
]


SINGLE_PROCESS_CASES = CONFIG_CASES + DATA_CASES + TOKENIZER_CASES + HF_CASES


@pytest.mark.parametrize("case", SINGLE_PROCESS_CASES, ids=[c.name for c in SINGLE_PROCESS_CASES])
def test_malformed_input_fails_cleanly(case: Case, tmp_path, request):
    if case in HF_CASES:
        case.make.base = request.getfixturevalue("hf_base")
    run_case(case, tmp_path)


def test_case_names_are_distinct():
    names = [c.name for c in SINGLE_PROCESS_CASES]
    assert len(names) == len(set(names))


def test_random_bytes_never_escape_as_raw_errors(tmp_path):
    """Fuzz: random byte soup as config, JSONL and char-tokenizer files, fresh every run."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    for i in range(30):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        for kind, call in (("config", lambda p: load_config(p)),
                           ("jsonl", lambda p: load_jsonl(p, fields=FIELDS)),
                           ("char", lambda p: CharTokenizer.from_file(p))):
            path = tmp_path / f"{kind}_{i}.bin"
            path.write_bytes(blob)
            try:
                call(path)
            except (ValueError, FileNotFoundError) as e:
                check_clean(e, error=ValueError, needles=[str(path)])
            # Some random blobs happen to be valid YAML mappings with known keys: accepting is fine.
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"seed {seed}: {kind} blob {blob!r} raised {type(e).__name__}: {e}")
