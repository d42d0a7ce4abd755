"""No code path deserialises user files unsafely: an AST scan of the repository's Python code.

Flagged (comments and strings never trigger, because the scan walks the syntax tree):
  * ``pickle.load`` / ``pickle.loads`` / ``pickle.Unpickler`` (also ``cPickle``, ``dill``, ``joblib.load``)
  * ``torch.load(...)`` without a literal ``weights_only=True``
  * ``yaml.load(...)`` without ``Loader=yaml.SafeLoader`` / ``CSafeLoader``; ``yaml.unsafe_load`` / ``full_load``
  * ``numpy.load(..., allow_pickle=True)``
  * builtin ``eval(...)`` / ``exec(...)``
  * ``trust_remote_code=True`` (runs code shipped inside a model directory)
  * ``subprocess.*(..., shell=True)`` / ``os.system``
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("rlad_megatron", "tools", "checkpoints_convert", "launch", "benchmarks")

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle"}
_PICKLE_FUNCS = {"load", "loads", "Unpickler"}
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _dotted(node: ast.AST) -> str:
    """'a.b.c' for Name/Attribute chains, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


class _Scanner(ast.NodeVisitor):
    def __init__(self):
        self.findings: list[tuple[int, str]] = []
        self.aliases: dict[str, str] = {}  # local name -> fully qualified ('load' -> 'pickle.load')

    def _flag(self, node: ast.AST, what: str) -> None:
        self.findings.append((node.lineno, what))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        self.generic_visit(node)

    def _qualified(self, func: ast.AST) -> str:
        name = _dotted(func)
        if not name:
            return ""
        head, _, rest = name.partition(".")
        head = self.aliases.get(head, head)
        return f"{head}.{rest}" if rest else head

    def visit_Call(self, node: ast.Call) -> None:
        q = self._qualified(node.func)
        mod, _, fn = q.rpartition(".")
        if mod.split(".")[0] in _PICKLE_MODULES and fn in _PICKLE_FUNCS:
            self._flag(node, f"{q}(): unpickling runs arbitrary code")
        elif q == "joblib.load":
            self._flag(node, "joblib.load(): unpickles")
        elif q == "torch.load" and not _is_true(_kw(node, "weights_only")):
            self._flag(node, "torch.load() without weights_only=True")
        elif q == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in _SAFE_YAML_LOADERS:
                self._flag(node, "yaml.load() without SafeLoader (use yaml.safe_load)")
        elif q in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            self._flag(node, f"{q}(): constructs arbitrary objects")
        elif q in ("numpy.load", "np.load") and _is_true(_kw(node, "allow_pickle")):
            self._flag(node, "numpy.load(allow_pickle=True)")
        elif q in ("eval", "exec") and isinstance(node.func, ast.Name):
            self._flag(node, f"{q}(): executes data as code")
        elif q == "os.system" or (q.startswith("subprocess.") and _is_true(_kw(node, "shell"))):
            self._flag(node, f"{q}() through a shell")
        if _is_true(_kw(node, "trust_remote_code")):
            self._flag(node, "trust_remote_code=True runs code from the model directory")
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source, filename=filename))
    return scanner.findings


def _python_files() -> list[Path]:
    files = []
    for top in SCANNED:
        if (ROOT / top).is_dir():
            files += sorted((ROOT / top).rglob("*.py"))
    return files


def test_repository_has_no_unsafe_deserialisation():
    files = _python_files()
    assert len(files) > 20, f"scanned only {len(files)} files; is the layout unchanged?"
    problems = []
    for path in files:
        for line, what in scan_source(path.read_text(encoding="utf-8"), str(path)):
            problems.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not problems, "unsafe calls:\n" + "\n".join(problems)


BAD = [
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle as pk\npk.loads(b'')",
    "from pickle import load\nload(f)",
    "from pickle import Unpickler as U\nU(f).load()",
    "import dill\ndill.load(f)",
    "import joblib\njoblib.load('m.pkl')",
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=flag)",
    "from torch import load\nload('x.pt')",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.load(text, yaml.FullLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load(text)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "eval(user_text)",
    "exec(open('f').read())",
    "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
    "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import os\nos.system(cmd)",
]

GOOD = [
    "# pickle.load(f) and torch.load(p) in a comment\nx = 1",
    "s = 'yaml.load(text) eval(x) exec(y) torch.load(p)'",
    "import torch\ntorch.load('x.pt', weights_only=True)",
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.load(text, Loader=yaml.CSafeLoader)",
    "import pickle\npickle.dumps(obj)",
    "import json\njson.load(f)",
    "model.eval()",
    "import numpy as np\nnp.load('a.npy')",
    "import subprocess\nsubprocess.run(['ls', '-l'], check=True)",
    "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(p, local_files_only=True)",
]


@pytest.mark.parametrize("source", BAD)
def test_scanner_flags(source):
    assert scan_source(source), source


@pytest.mark.parametrize("source", GOOD)
def test_scanner_allows(source):
    assert not scan_source(source), (source, scan_source(source))


def test_pickled_weights_are_refused(tmp_path):
    """A directory holding only pickled weights (*.bin/*.pt) is refused before anything is unpickled."""
    import torch

    from rlad_megatron.hf.io import tensor_index

    for name in ("pytorch_model.bin", "model.pt", "consolidated.pth"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        torch.save({"w": torch.zeros(2)}, d / name)
        with pytest.raises(ValueError, match=f"only safetensors.*{name}"):
            tensor_index(d)
