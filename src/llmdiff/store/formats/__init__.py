"""Readers for the dumps of the tools llmdiff replaces. Each turns a foreign layout into a
:class:`~llmdiff.store.reader.Dump` of llmdiff entries (module path, step, call, part, path), so the
compare stage never knows where a dump came from. Tensor files are only ever read with
``torch.load(weights_only=True)``.

| format  | recognized by |
|---------|---------------|
| msprobe | ``dump.json`` in ``step*/{rank*,proc*}/`` (or in the folder given) |
| msit    | ``torch_tensors/<device>_<pid>/<token>/<module>/*.pth`` |
| vllm    | ``step_<N>/<module>/{inputs,outputs}*_<device>.pt`` |
| sglang  | ``...___name=<name>.pt`` files |
"""

from __future__ import annotations

from pathlib import Path

from llmdiff.store.reader import Dump


def open_foreign_dump(path: Path) -> Dump | None:
    """Open ``path`` with the first reader that recognizes its layout; None when none does."""
    from llmdiff.store.formats import msit, msprobe, sglang, vllm

    for recognizes, opener in ((msprobe.is_msprobe_dump, msprobe.open_msprobe_dump),
                               (msit.is_msit_dump, msit.open_msit_dump),
                               (vllm.is_vllm_dump, vllm.open_vllm_dump),
                               (sglang.is_sglang_dump, sglang.open_sglang_dump)):
        if recognizes(path):
            return opener(path)
    return None
