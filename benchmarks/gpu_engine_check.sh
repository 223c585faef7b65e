#!/usr/bin/env bash
# End-to-end engine check on a GPU: base-to-new ALIGN and MaPLe on a generated image folder, ViT-B/16 random
# weights, bf16 and fp16 autocast; prints the results files. Usage: bash benchmarks/gpu_engine_check.sh OUTDIR
set -euo pipefail
out=${1:-/tmp/gpu_engine}
python - "$out/tree" <<'PY'
import sys, numpy as np
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1]); rng = np.random.default_rng(0)
for c, name in enumerate(["red_thing", "green_thing", "blue_thing", "dark_thing"]):
    for split, n in (("train", 8), ("val", 2), ("test", 8)):
        folder = root / split / name; folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8); image[..., c % 3] += 150
            Image.fromarray(image).save(folder / f"{i}.png")
PY
for method in ${METHODS:-align maple}; do
  for precision in bf16 fp16; do
    vlprompt train --method $method --protocol base2new --dataset custom_folder --data-root "$out/tree" \
      --shots 4 --backbone ViT-B-16 --pretrained none --device cuda --precision $precision \
      --output "$out/runs" --tag $precision --quiet --set optim.epochs=2 --set optim.stop_epoch=null \
      --set data.num_workers=2
  done
done
find "$out/runs" -name results.json | sort | while read f; do
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/runs/')[1], {k: r.get(k) for k in ('accuracy','metrics','precision','wall_time_s') if k in r})" "$f"
done
