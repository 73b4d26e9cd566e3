#!/bin/bash
set -x
. /work/main/.venv/bin/activate
export HF_HUB_OFFLINE=1
M=/tmp/demo_clipart/runs/3t_imagenet_seed0/model
rm -rf /tmp/use/emb_train /tmp/use/rt*
/usr/bin/time -f "wall %e s, peak %M KB" threetowers embed $M '/tmp/clipart/train/{00000..00005}.tar' --out /tmp/use/emb_train
ls -la /tmp/use/emb_train | head -20; du -sh /tmp/use/emb_train
/usr/bin/time -f "again: wall %e s" threetowers embed $M '/tmp/clipart/train/{00000..00005}.tar' --out /tmp/use/emb_train
python -c "import threetowers as tt, numpy as np; k, e = tt.load_embeddings('/tmp/use/emb_train'); print(len(k), e.shape, e.dtype, float(np.linalg.norm(e.astype('float32'), axis=1).mean()))"
C=/tmp/clipart/wds/clipart_category
/usr/bin/time -f "wall %e s" threetowers classify $M $C/test/0.tar --labels-file $C/classnames.txt --templates $C/zeroshot_classification_templates.txt --top-k 3 --out /tmp/use/classify.csv | tail -8
python - <<'PY'
import csv, webdataset as wds
classes = open('/tmp/clipart/wds/clipart_category/classnames.txt').read().splitlines()
truth = {k: classes[int(c)] for k, c in wds.WebDataset('/tmp/clipart/wds/clipart_category/test/0.tar', shardshuffle=False).to_tuple('__key__', 'cls')}
rows = list(csv.DictReader(open('/tmp/use/classify.csv')))
print(rows[0].keys())
key = next(k for k in rows[0] if 'key' in k or k == 'image')
lab = next(k for k in rows[0] if k.startswith('label'))
hits = sum(truth[r[key].split(':')[-1].split('/')[-1]] == r[lab] for r in rows)
print(f"classify top-1 on clipart_category test: {hits}/{len(rows)} = {100*hits/len(rows):.1f}%")
PY
threetowers eval $M --benchmark wds/clipart_category --dataset-root $C --out /tmp/use/eval_cat.json | head -5
# round trip on the clipart demo's CLIP (seed 0): export -> import -> export
threetowers export /tmp/demo_clipart/runs/clip_seed0/model /tmp/use/rt1
python - <<'PY'
import torch, threetowers as tt
from safetensors.torch import load_file
model, tok = tt.import_open_clip("local-dir:/tmp/use/rt1")
import tempfile, pathlib
d = pathlib.Path('/tmp/use/rt_model'); tt.save_model(model, d); tok.save(d / 'tokenizer.json')
tt.export_open_clip(d, '/tmp/use/rt2')
a, b = load_file('/tmp/use/rt1/open_clip_model.safetensors'), load_file('/tmp/use/rt2/open_clip_model.safetensors')
print('tensors', len(a), 'identical', sum(torch.equal(a[k], b[k]) for k in a), 'same names', a.keys() == b.keys())
orig = tt.load_model('/tmp/demo_clipart/runs/clip_seed0/model')
x = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
t = tok(["a red apple", "a cartoon cat with a hat", "the flag of france"])
print('image max|diff|', float((orig.encode_image(x) - model.encode_image(x)).abs().max()),
      'text max|diff|', float((orig.encode_text(t) - model.encode_text(t)).abs().max()))
PY
