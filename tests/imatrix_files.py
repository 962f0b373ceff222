"""Importance matrix files for tests, in llama-imatrix's GGUF layout (`<name>.in_sum2` sums and
`<name>.counts`, with its three keys)."""

from __future__ import annotations

import numpy as np
from gguf import GGUFValueType, GGUFWriter


def write_imatrix(path, entries: dict[str, tuple[np.ndarray | None, list[float] | None]], keys: bool = True) -> None:
    """entries: tensor name -> (sums, counts); a None part is left out (a broken file)."""
    w = GGUFWriter(path, "imatrix")
    w.kv_data[0].pop("general.architecture", None)
    if keys:
        w.add_key_value("imatrix.datasets", ["wiki.txt"], GGUFValueType.ARRAY, GGUFValueType.STRING)
        w.add_key_value("imatrix.chunk_count", 7, GGUFValueType.UINT32)
        w.add_key_value("imatrix.chunk_size", 512, GGUFValueType.UINT32)
    for name, (sums, counts) in entries.items():
        if sums is not None:
            w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        if counts is not None:
            w.add_tensor(f"{name}.counts", np.array(counts, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
