"""Memory stays flat: converting a 4x larger checkpoint must not raise the peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

from paths import REPO
from tiny_models import TinySpec, flat_config, write_small_tokenizer

PEAK = """
import resource, sys
from qvl.convert.cli import main
sys.argv = ["qvl-convert", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_mib(tmp_path, name: str, spec: TinySpec) -> tuple[float, int]:
    tok = tmp_path / "tok"
    tok.mkdir(exist_ok=True)
    write_small_tokenizer(tok)
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps(flat_config(spec)))
    src = tmp_path / name
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_random_checkpoint.py"), str(cfg), str(src),
                    "--tokenizer", str(tok)], check=True, capture_output=True)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", PEAK, str(src), "-o", str(tmp_path / f"{name}.gguf"),
                          "--type", "q8_0", "-q"], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024, size


def test_peak_rss_does_not_grow_with_model_size(tmp_path):
    small = TinySpec(hidden=512, intermediate=1024, layers=2, heads=8, kv_heads=2, vocab_size=32768)
    large = replace(small, layers=8, vocab_size=131072)
    rss_small, size_small = _peak_rss_mib(tmp_path, "small", small)
    rss_large, size_large = _peak_rss_mib(tmp_path, "large", large)
    assert size_large > 3.5 * size_small  # about 90 MB vs 330 MB of bf16
    # Measured: +6 MiB streaming; +42 MiB when mapped pages are kept (no MADV_DONTNEED);
    # reading whole tensors would add ~240 MiB.
    assert rss_large - rss_small < 25, (rss_small, rss_large, size_small, size_large)
