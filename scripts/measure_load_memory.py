"""Measure peak host memory (RSS high-water mark) while `load_pretrained` reads a sharded checkpoint.

Writes a random ~330 MB checkpoint (fp32, 100 MB shards) in a child process, then in a fresh child imports the
model code, records the RSS baseline, loads, and reports the peak increase next to the size of the weights.
A load that streams tensor by tensor peaks near one copy of the weights (about 1.0x); one that materialises a
state dict first needs about 2x. The numbers depend on the machine and allocator, so this is a script, not a test.

    python scripts/measure_load_memory.py --dir /tmp/ckpt_mem
    python scripts/measure_load_memory.py --smoke       # the tiny preset in a temp dir: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRITE = """
import torch, dataclasses
from model import Qwen3VL, preset, save_pretrained
c = preset('tiny')
if {big}:
  c = c.replace(text=dataclasses.replace(c.text, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                       num_key_value_heads=4, head_dim=64, rope=dataclasses.replace(c.text.rope,
                                       mrope_section=(12, 10, 10))),
              vision=dataclasses.replace(c.vision, out_hidden_size=512))
save_pretrained(Qwen3VL(c), {dir!r}, max_shard_size={shard!r})
"""

LOAD = """
import json, resource, torch
from model import load_pretrained
def rss_mb():  # current resident set, from /proc
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
# warm up: the first use of the meta device imports torch's meta kernels (~150 MB of code, not weights)
from model import Qwen3VL, preset
with torch.device('meta'):
    Qwen3VL(preset('tiny'), init_weights=False)
base = rss_mb()
m = load_pretrained({dir!r}, progress=False)
# touch every weight so that lazily mapped pages are resident and counted
with torch.no_grad():
    checksum = float(sum(p.sum() for p in m.parameters()))  # reads every page, no copy
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # high-water mark, MB
weights = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
print(json.dumps({{"baseline_mb": round(base, 1), "peak_mb": round(peak, 1),
                  "peak_increase_mb": round(peak - base, 1), "weights_mb": round(weights, 1)}}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="where to write the test checkpoint (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--smoke", action="store_true", help="the tiny preset (~80 MB in fp32, 10 MB shards)")
    args = ap.parse_args()
    if args.dir is None:
        args.dir = str(Path(tempfile.gettempdir()) / ("qwen3vl_mem_smoke" if args.smoke else "qwen3vl_mem"))
    d = str(Path(args.dir).resolve())
    if not (Path(d) / "model.safetensors.index.json").is_file():
        write = WRITE.format(dir=d, big=not args.smoke, shard="10MB" if args.smoke else "100MB")
        subprocess.run([sys.executable, "-c", write], check=True, cwd=ROOT)
    out = subprocess.run([sys.executable, "-c", LOAD.format(dir=d)], check=True, cwd=ROOT, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"weights {r['weights_mb']} MB; RSS baseline {r['baseline_mb']} MB, peak {r['peak_mb']} MB "
              f"(+{r['peak_increase_mb']} MB = {r['peak_increase_mb'] / r['weights_mb']:.2f}x the weights)")


if __name__ == "__main__":
    main()
