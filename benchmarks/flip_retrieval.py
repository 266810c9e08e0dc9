"""Retrieval sanity on a trained run: every sampled image searched by its own file must come back
first at every level (score >= 0.999), and how often a horizontally flipped copy finds the
original in the top 5 / top 1 per level.

    python benchmarks/flip_retrieval.py RUN WORKDIR [--images 2000] [--sample 100]
"""
import argparse
import json
import random
from pathlib import Path
from PIL import Image, ImageOps
from sjea_tools.data.write_folder import write_image_folder
from sjea_tools.pipeline import embed_and_index
from sjea_tools.search import search_store

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("run")
ap.add_argument("workdir")
ap.add_argument("--images", type=int, default=2000)
ap.add_argument("--sample", type=int, default=100)
args = ap.parse_args()
root, run = Path(args.workdir), args.run
write_image_folder("fashion-mnist", root / "images", split="test", limit=args.images)
store = root / "fmnist.h5"
if not store.exists():
    print(embed_and_index(root / "images", store, run=run, workers=2))  # search needs the indexes
paths = sorted(str(p.relative_to(root / "images")) for p in (root / "images").rglob("*.png"))
random.seed(0)
sample = random.sample(paths, args.sample)
(root / "q").mkdir(exist_ok=True)
flipped, selfq = [], []
for rel in sample:
    img = Image.open(root / "images" / rel)
    q = root / "q" / rel.replace("/", "_")
    ImageOps.mirror(img).save(q)
    flipped.append(str(q)); selfq.append(str(root / "images" / rel))
res = search_store(store, queries=selfq, k=5, mode="per-level")
self_ok = all(r["per_level"][lv][0]["path"] == rel and r["per_level"][lv][0]["score"] >= 0.999
              for r, rel in zip(res["results"], sample) for lv in r["per_level"])
res = search_store(store, queries=flipped, k=5, mode="per-level")
top5 = {lv: sum(rel in [h["path"] for h in r["per_level"][lv]] for r, rel in zip(res["results"], sample))
        for lv in res["results"][0]["per_level"]}
top1 = {lv: sum(rel == r["per_level"][lv][0]["path"] for r, rel in zip(res["results"], sample))
        for lv in res["results"][0]["per_level"]}
print(json.dumps({"self_first_every_level_score_ge_0.999": self_ok, "sample": len(sample), "flipped_original_in_top5": top5,
                  "flipped_original_top1": top1}))
